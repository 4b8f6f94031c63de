"""GEMM kernels shared by the MoLoRA and LoRA linears.

:func:`ext_gemm`: the frozen linear with its K extended by the LoRA rank space, so the output is written
once::

    C = [C +] A0 @ B0 (+ bias) + H[:, routed] @ B_all + H[:, shared] @ B_s + HL @ B_l

Forward: ``y = x @ W.T + b + H @ [B_all | B_s].T`` (``H`` from :mod:`medcare_kernels.backends.triton.shrink`).
Backward: ``dx = dy @ W + dZ @ [A_all; A_s] + d_logits @ W_r``. The routed segment walks the experts'
rank columns chunk by chunk; with ``indices`` given, a chunk whose experts no token of the row tile
chose is masked off (no memory traffic for its ``B`` rows: decode reads only the chosen experts).
With ``A0`` None the base term is skipped and ``C`` is read and accumulated into (``accumulate``):
the cuBLAS-base variant, where ``torch.nn.functional.linear`` computes ``x @ W.T + b`` and this kernel
adds the LoRA term in one read-modify-write pass over ``y``.

:func:`token_reduce`: ``C = P.T @ Q`` reduced over the tokens (weight gradients: ``dA = dZ.T @ lx``,
``dB = dy.T @ H``, ``dW_r = d_logits.T @ x``), split over the tokens into float32 partials when the
output alone has too few tiles to fill the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from medcare_kernels import dispatch
from medcare_kernels.backends.triton._common import INTERPRET, autotune, bucket, cdiv, cfg, mma, num_sms, pow2, split_k

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): large tiles for prefill on Hopper/Ampere, thin-M tiles with
# long K steps for decode (few tokens: the weight read dominates, many N tiles keep the SMs busy).
_EXT_CONFIGS = [cfg(w, s, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8) for bm, bn, bk, w, s in (
    (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 128, 32, 4, 4),
    (64, 256, 64, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
    (32, 128, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 256, 4, 3), (16, 256, 64, 4, 4))]
_EXT_INTERP = cfg(4, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=2)

_RED_CONFIGS = [cfg(w, s, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk) for bm, bn, bk, w, s in (
    (128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4),
    (64, 64, 128, 4, 3), (32, 128, 64, 4, 4), (128, 32, 64, 4, 4))]
_RED_INTERP = cfg(4, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=16)


@triton.jit
def _dot_segment(acc, a_ptr, s_am, s_ak, OFF, b_ptr, s_bk, s_bn, K, K_END, rm64, mmask, rn, nmask,
                 BK: tl.constexpr):
    """``acc + a[rm, OFF:OFF + K] @ b[:K, rn]`` in steps of ``BK`` up to ``K_END`` (>= K): ``a`` addressed as
    ``row * s_am + OFF + k * s_ak``, ``b`` as ``k * s_bk + n * s_bn``; rows, columns and k past K masked."""
    ck = tl.arange(0, BK)
    for k0 in range(0, K_END, BK):
        kk = k0 + ck
        kv = kk < K
        a = tl.load(a_ptr + rm64[:, None] * s_am + OFF + kk[None, :] * s_ak, mask=mmask[:, None] & kv[None, :],
                    other=0.0)
        b = tl.load(b_ptr + kk[:, None] * s_bk + rn[None, :] * s_bn, mask=kv[:, None] & nmask[None, :], other=0.0)
        acc = mma(a, b, acc)
    return acc


@autotune(_EXT_CONFIGS, _EXT_INTERP, key=["M_BUCKET", "N", "K0", "s_b0k", "E", "R", "RS", "NL", "BASE", "ACC",
                                                "SKIP", "USED"],
          restore_value=["c_ptr"])
@triton.jit
def _ext_gemm_kernel(a0_ptr, b0_ptr, bias_ptr, hz_ptr, br_ptr, bs_ptr, hl_ptr, bl_ptr, idx_ptr, used_ptr, c_ptr,
                     M, N, K0, E, R, RS, NL, TOPK, M_BUCKET,
                     s_a0m, s_a0k, s_b0k, s_b0n, s_hz, s_bre, s_brc, s_brn, s_bsc, s_bsn, s_hl, s_blc, s_bln, s_cm,
                     E_R: tl.constexpr, R_PAD: tl.constexpr, WR: tl.constexpr, RS_PAD: tl.constexpr,
                     NL_PAD: tl.constexpr, KP: tl.constexpr, BKE: tl.constexpr, BKS: tl.constexpr,
                     BKL: tl.constexpr, BASE: tl.constexpr, ROUTED: tl.constexpr, SHARED: tl.constexpr,
                     ROUTER: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, SKIP: tl.constexpr,
                     USED: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    group = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group
    pid_n = (pid % width) // group
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < N
    rm64 = rm.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if BASE:
        acc = _dot_segment(acc, a0_ptr, s_a0m, s_a0k, 0, b0_ptr, s_b0k, s_b0n, K0, K0, rm64, mmask, rn, nmask, BLOCK_K)
    if ROUTED:
        if SKIP:
            cj = tl.arange(0, KP)
            chosen = tl.load(idx_ptr + rm64[:, None] * TOPK + cj[None, :], mask=mmask[:, None] & (cj < TOPK)[None, :],
                             other=-1).to(tl.int32)
        ce = tl.arange(0, BKE)
        for k0 in range(0, WR, BKE):
            kk = k0 + ce
            e = kk // R_PAD
            c = kk % R_PAD
            kv = (e < E) & (c < R)
            if USED:  # experts no token chose are never read: an inf there must not meet H's zeros
                kv = kv & (tl.load(used_ptr + e, mask=e < E, other=0) != 0)
            if SKIP:
                e_lo = k0 // R_PAD
                e_hi = (k0 + BKE - 1) // R_PAD + 1
                present = tl.sum(((chosen >= e_lo) & (chosen < e_hi)).to(tl.int32)) > 0
                kv = kv & present
            h = tl.load(hz_ptr + rm64[:, None] * s_hz + kk[None, :], mask=mmask[:, None] & kv[None, :], other=0.0)
            b = tl.load(br_ptr + e[:, None] * s_bre + c[:, None] * s_brc + rn[None, :] * s_brn,
                        mask=kv[:, None] & nmask[None, :], other=0.0)
            acc = mma(h, b, acc)
    if SHARED:
        acc = _dot_segment(acc, hz_ptr, s_hz, 1, WR, bs_ptr, s_bsc, s_bsn, RS, RS_PAD, rm64, mmask, rn, nmask, BKS)
    if ROUTER:
        acc = _dot_segment(acc, hl_ptr, s_hl, 1, 0, bl_ptr, s_blc, s_bln, NL, NL_PAD, rm64, mmask, rn, nmask, BKL)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm64[:, None] * s_cm + rn[None, :]
    cmask = mmask[:, None] & nmask[None, :]
    if ACC:
        acc += tl.load(c_ptrs, mask=cmask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=cmask)


def _mat(t: torch.Tensor | None, rows: int, cols: int) -> tuple[int, int]:
    """(row stride, col stride) of a 2-D operand, or zeros for an absent one."""
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def ext_gemm(out: torch.Tensor, *, a0=None, b0=None, bias=None, hz=None, routed=None, shared=None, router=None,
             indices=None, used=None, layout=None, accumulate: bool = False) -> torch.Tensor:
    """Fill ``out`` [M, N] (any float dtype) with ``[out +] a0 @ b0 + bias + LoRA segments``.

    a0 [M, K0] and b0 [K0, N] (any strides) or None; ``hz`` [M, W] the rank-space activations (layout of
    :class:`medcare_kernels.backends.triton.shrink.Layout`); ``routed`` = (tensor, s_e, s_c, s_n): the experts'
    [E, r] x N operand addressed as ``e * s_e + c * s_c + n * s_n``; ``shared`` = [r_s, N] operand;
    ``router`` = (hl [M, E], [E, N] operand). ``indices`` [M, k]: skip experts no row of a tile chose;
    ``used`` [E] int8: skip experts no token chose at all (never read, whatever they hold).
    """
    M, N = out.shape
    if M == 0 or N == 0:
        return out
    L = layout
    dummy = out
    K0 = a0.shape[1] if a0 is not None else 0
    s_a0 = _mat(a0, M, K0)
    s_b0 = _mat(b0, K0, N)
    rt, s_bre, s_brc, s_brn = routed if routed is not None else (dummy, 0, 0, 0)
    sh = shared
    hl, bl = router if router is not None else (dummy, dummy)
    NL = bl.shape[0] if router is not None else 0
    NL_PAD = pow2(NL, 16) if router is not None else 16
    R_PAD = L.R_PAD if L is not None else 16
    RS_PAD = L.RS_PAD if L is not None else 16
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _ext_gemm_kernel[grid](
        a0 if a0 is not None else dummy, b0 if b0 is not None else dummy, bias if bias is not None else dummy,
        hz if hz is not None else dummy, rt, sh if sh is not None else dummy, hl, bl,
        indices if indices is not None else dummy, used if used is not None else dummy, out,
        M, N, K0, L.E if L else 0, L.R if L else 0, L.RS if L else 0, NL, L.K if L else 1, bucket(M),
        s_a0[0], s_a0[1], s_b0[0], s_b0[1], hz.stride(0) if hz is not None else 0, s_bre, s_brc, s_brn,
        *_mat(sh, 0, 0), hl.stride(0) if router is not None else 0, *_mat(bl if router is not None else None, 0, 0),
        out.stride(0),
        E_R=L.E_R if L else 1, R_PAD=R_PAD, WR=L.WR if L else 0, RS_PAD=RS_PAD,
        NL_PAD=NL_PAD, KP=pow2(L.K if L else 1), BKE=max(16, min(R_PAD, 64)), BKS=min(RS_PAD, 64),
        BKL=min(NL_PAD, 64), BASE=a0 is not None, ROUTED=routed is not None, SHARED=shared is not None,
        ROUTER=router is not None, HAS_BIAS=bias is not None, ACC=accumulate, SKIP=indices is not None,
        USED=used is not None)
    return out


@autotune(_RED_CONFIGS, _RED_INTERP, key=["M", "N", "K_BUCKET", "SPLIT"])
@triton.jit
def _token_reduce_kernel(p_ptr, q_ptr, c_ptr, M, N, K, K_BUCKET, s_pk, s_qk, s_cs, s_cm,
                         SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < N
    ck = tl.arange(0, BLOCK_K)
    per = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT) * BLOCK_K  # this program's slice of the tokens
    k_lo = pid_s * per
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(k_lo, k_lo + per, BLOCK_K):
        kk = (k0 + ck).to(tl.int64)
        kv = kk < K
        p = tl.load(p_ptr + kk[None, :] * s_pk + rm[:, None], mask=mmask[:, None] & kv[None, :], other=0.0)
        q = tl.load(q_ptr + kk[:, None] * s_qk + rn[None, :], mask=kv[:, None] & nmask[None, :], other=0.0)
        acc = mma(p, q, acc)
    tl.store(c_ptr + pid_s.to(tl.int64) * s_cs + rm[:, None].to(tl.int64) * s_cm + rn[None, :], acc,
             mask=mmask[:, None] & nmask[None, :])


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit column stride (a size-0 or size-1 dimension may carry any stride, e.g. ``x.T`` of a
    [1, n] tensor, or an expanded zero gradient)."""
    return t if t.stride(1) == 1 else t.clone(memory_format=torch.contiguous_format)


def token_reduce(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``p.T @ q`` in float32 (any input dtypes, IEEE float32 products for mixed ones): p [T, M], q [T, N]
    -> [M, N], reduced over T."""
    T, M = p.shape
    N = q.shape[1]
    if T == 0:
        return torch.zeros(M, N, dtype=torch.float32, device=p.device)
    p, q = _row_major(p), _row_major(q)
    tiles = cdiv(M, 64) * cdiv(N, 64)
    split = split_k(tiles, T, p.device, min_chunk=256)
    out = torch.empty(split, M, N, dtype=torch.float32, device=p.device)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]), cdiv(N, meta["BLOCK_N"]), split)  # noqa: E731
    _token_reduce_kernel[grid](p, q, out, M, N, T, bucket(T), p.stride(0), q.stride(0), M * N, N, SPLIT=split)
    return out[0] if split == 1 else out.sum(0)


def base_plus_lora(a0: torch.Tensor, b0: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                   **lora) -> torch.Tensor:
    """``a0 @ b0 (+ bias) + LoRA segments`` [M, N] in ``out_dtype``: the frozen GEMM (forward ``x @ W.T``,
    backward ``dy @ W``) with the rank space added. From ``CUBLAS_BASE_MIN_TOKENS`` rows
    (:func:`medcare_kernels.dispatch.triton_base`) cuBLAS computes the base and :func:`ext_gemm` adds the
    segments in one read-modify-write pass; below it the base runs inside the K-extended kernel (the
    output written once). ``lora``: :func:`ext_gemm`'s segment arguments (with ``layout``)."""
    M, N = a0.shape[0], b0.shape[1]
    if dispatch.triton_base(M) == "cublas":
        out = (torch.mm(a0, b0) if bias is None else torch.addmm(bias, a0, b0)).to(out_dtype)
        if any(lora.get(k) is not None for k in ("hz", "router")):
            ext_gemm(out, accumulate=True, **lora)
        return out
    out = torch.empty(M, N, dtype=out_dtype, device=a0.device)
    return ext_gemm(out, a0=a0, b0=b0, bias=bias, **lora)


def weight_grad(p: torch.Tensor, q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``p.T @ q`` [M, N] for a weight gradient of ``dtype``: cuBLAS (each operand read once) when both
    operands and the gradient share one dtype; else :func:`token_reduce` (float32 result, so a float32
    parameter's gradient keeps float32 precision from 16-bit activations)."""
    if p.dtype == q.dtype == dtype:
        return torch.mm(p.T, q) if p.shape[0] else torch.zeros(p.shape[1], q.shape[1], dtype=dtype, device=p.device)
    return token_reduce(p, q)


__all__ = ["base_plus_lora", "ext_gemm", "token_reduce", "weight_grad", "INTERPRET", "num_sms"]
