"""Grouped (expert-sorted) MoLoRA path, for wide ``E*r``: only the chosen experts' ``k*r`` rank columns
per token are computed, never all ``E*r``.

Token slots (token t, choice j) are sorted on the device by ``(j, expert)`` (``argsort`` + a scatter-add
histogram + ``cumsum``: no ``.item()``, no data-dependent shape). Each kernel's grid is a static upper
bound on the number of ``BLOCK_M``-slot tiles (``cdiv(slots, BLOCK_M) + groups``); a program finds its
(group, tile) from the device-side tile offsets and masks itself off when it has none.

* :func:`_grouped_shrink_kernel`: per tile of one expert's slots, ``src[token] @ M_e`` over the long
  dimension with gathered rows. Forward: ``z_slot = lx[t] @ A_e.T`` written in slot order (the contract's
  ``z``). Backward: ``dh = dy[t] @ B_e``, then the gate-weight gradient ``s * <dh, z_slot>`` and the
  gated ``dZ_slot = s * w * dh`` (weights multiplied in rank space).
* :func:`_grouped_expand_kernel`: ``out[t] = in[t] + V_slot @ M_e`` for the slots of one choice ``j``.
  Each token has exactly one slot per ``j``, so one launch per ``j`` writes every row once: results are
  added **without atomics** (``k`` launches, deterministic). The base (and shared experts, router) come
  from the K-extended GEMM into a float32 accumulator ``[T, N]``; the last pass writes ``y``/``dx`` in
  the output dtype.
* :func:`_grouped_reduce_kernel`: per expert, ``sum over its slots P[slot].T Q[slot]`` (``dA``, ``dB``);
  an expert with no slots runs no iteration and writes exact zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from medcare_kernels.backends.triton import route as troute
from medcare_kernels.backends.triton._common import INTERPRET, autotune, cdiv, cfg, compute_dtype, mma, pow2
from medcare_kernels.backends.triton.gemm import ext_gemm, token_reduce
from medcare_kernels.backends.triton.shrink import Layout, shrink_backward, shrink_forward

_SHRINK_CONFIGS = [cfg(w, s, BLOCK_K=bk) for bk in (64, 128) for w, s in ((4, 3), (4, 4), (8, 3))]
_EXPAND_CONFIGS = [cfg(w, s, BLOCK_N=bn) for bn in (64, 128, 256) for w, s in ((4, 3), (8, 3))]
_REDUCE_CONFIGS = [cfg(w, s, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk) for bm, bn, bk, w, s in (
    (64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (32, 64, 128, 4, 3), (16, 128, 64, 4, 3))]


def _block_m() -> int:
    return 16 if INTERPRET else 64


class Sorted:
    """Slots sorted by (choice j, expert): ``order`` [T*k] slot ids; ``seg`` [k*E + 1] segment offsets;
    ``tiles`` [k*E + 1] tile offsets for ``block_m``-slot tiles. All on the device, no synchronisation."""

    def __init__(self, indices: torch.Tensor, experts: int, block_m: int):
        T, K = indices.shape
        dev = indices.device
        G = K * experts
        key = (torch.arange(K, device=dev) * experts + indices).reshape(-1)
        self.order = torch.argsort(key, stable=True).to(torch.int32)
        ones = torch.ones_like(key, dtype=torch.int32)
        counts = torch.zeros(G, dtype=torch.int32, device=dev).scatter_add_(0, key, ones)
        self.seg = torch.zeros(G + 1, dtype=torch.int32, device=dev)
        self.seg[1:] = torch.cumsum(counts, 0)
        self.tiles = torch.zeros(G + 1, dtype=torch.int32, device=dev)
        self.tiles[1:] = torch.cumsum((counts + block_m - 1) // block_m, 0)
        self.T, self.K, self.E, self.block_m = T, K, experts, block_m


@triton.jit
def _find_tile(order_ptr, seg_ptr, tiles_ptr, tile, G_LO, NG, K, NG_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """The group (relative to G_LO) holding this program's tile, the tile's slots, tokens, choices, mask."""
    cg = tl.arange(0, NG_PAD)
    ends = tl.load(tiles_ptr + G_LO + 1 + cg, mask=cg < NG, other=2147483647)
    t_glob = tile + tl.load(tiles_ptr + G_LO)
    g = tl.sum((ends <= t_glob).to(tl.int32), axis=0)
    valid = g < NG
    gs = tl.minimum(g, NG - 1)
    local = t_glob - tl.load(tiles_ptr + G_LO + gs)
    lo = tl.load(seg_ptr + G_LO + gs)
    hi = tl.load(seg_ptr + G_LO + gs + 1)
    pos = lo + local * BLOCK_M + tl.arange(0, BLOCK_M)
    pmask = (pos < hi) & valid
    slot = tl.load(order_ptr + pos, mask=pmask, other=0)
    return gs, valid, pmask, slot // K, slot % K, slot


@autotune(_SHRINK_CONFIGS, cfg(4, 1, BLOCK_K=16), key=["D", "R", "E", "K", "EPI"])
@triton.jit
def _grouped_shrink_kernel(src_ptr, mat_ptr, order_ptr, seg_ptr, tiles_ptr, z_ptr, wt_ptr, dz_ptr, dw_ptr,
                           D, E, R, K, NG, scaling, s_src, s_me, s_mc, s_mk, s_zt,
                           NG_PAD: tl.constexpr, RP: tl.constexpr, EPI: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    g, valid, pmask, token, j, slot = _find_tile(order_ptr, seg_ptr, tiles_ptr, tl.program_id(0), 0, NG, K,
                                                 NG_PAD, BLOCK_M)
    e = g % E
    tok64 = token.to(tl.int64)
    c = tl.arange(0, RP)
    cv = c < R
    ck = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, RP), tl.float32)
    for k0 in range(0, tl.where(valid, D, 0), BLOCK_K):  # programs past the last tile do nothing
        kk = k0 + ck
        kv = kk < D
        xs = tl.load(src_ptr + tok64[:, None] * s_src + kk[None, :], mask=pmask[:, None] & kv[None, :], other=0.0)
        m = tl.load(mat_ptr + e * s_me + c[None, :] * s_mc + kk[:, None] * s_mk, mask=kv[:, None] & cv[None, :] & valid,
                    other=0.0)
        acc = mma(xs, m, acc)
    zp = z_ptr + tok64[:, None] * s_zt + j[:, None] * R + c[None, :]
    zmask = pmask[:, None] & cv[None, :]
    if EPI == 0:
        tl.store(zp, acc, mask=zmask)
    else:
        zs = tl.load(zp, mask=zmask, other=0.0)
        w = tl.load(wt_ptr + tok64 * K + j, mask=pmask, other=0.0)
        tl.store(dw_ptr + slot, tl.sum(acc * zs, axis=1) * scaling, mask=pmask)
        tl.store(dz_ptr + slot.to(tl.int64)[:, None] * RP + c[None, :],
                 (acc * (w * scaling)[:, None]).to(dz_ptr.dtype.element_ty), mask=pmask[:, None])


@autotune(_EXPAND_CONFIGS, cfg(4, 1, BLOCK_N=32), key=["N", "R", "E", "GATED", "LOW"], restore_value=["out_ptr"])
@triton.jit
def _grouped_expand_kernel(v_ptr, wt_ptr, mat_ptr, order_ptr, seg_ptr, tiles_ptr, in_ptr, out_ptr,
                           N, E, R, K, J, scaling, s_vt, s_vj, s_me, s_mc, s_mn, s_in, s_out,
                           E_PAD: tl.constexpr, RP: tl.constexpr, GATED: tl.constexpr, LOW: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    g, valid, pmask, token, j, slot = _find_tile(order_ptr, seg_ptr, tiles_ptr, tl.program_id(0), J * E, E, K,
                                                 E_PAD, BLOCK_M)
    tok64 = token.to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    c = tl.arange(0, RP)
    cv = c < R
    v = tl.load(v_ptr + tok64[:, None] * s_vt + j[:, None] * s_vj + c[None, :], mask=pmask[:, None] & cv[None, :],
                other=0.0)
    if GATED:
        w = tl.load(wt_ptr + tok64 * K + j, mask=pmask, other=0.0)
        v = v * (w * scaling)[:, None]
    m = tl.load(mat_ptr + g * s_me + c[:, None] * s_mc + rn[None, :] * s_mn, mask=cv[:, None] & nmask[None, :] & valid,
                other=0.0)
    omask = pmask[:, None] & nmask[None, :]
    acc = tl.load(in_ptr + tok64[:, None] * s_in + rn[None, :], mask=omask, other=0.0).to(tl.float32)
    if LOW:  # a 16-bit computation (x and the LoRA share a 16-bit dtype): tensor-core operands
        v = v.to(mat_ptr.dtype.element_ty)
    acc = mma(v, m, acc)
    tl.store(out_ptr + tok64[:, None] * s_out + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=omask)


@autotune(_REDUCE_CONFIGS, cfg(4, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=16), key=["M", "N", "E", "K", "LOW"])
@triton.jit
def _grouped_reduce_kernel(p_ptr, q_ptr, wt_ptr, order_ptr, seg_ptr, c_ptr, M, N, E, K, scaling,
                           s_pt, s_pj, s_qt, s_qj, P_GATED: tl.constexpr, Q_GATED: tl.constexpr, LOW: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    e = tl.program_id(0)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < N
    ck = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for j in range(K):
        lo = tl.load(seg_ptr + j * E + e)
        hi = tl.load(seg_ptr + j * E + e + 1)
        for p0 in range(lo, hi, BLOCK_K):
            pos = p0 + ck
            pv = pos < hi
            tok = (tl.load(order_ptr + pos, mask=pv, other=0) // K).to(tl.int64)
            p = tl.load(p_ptr + tok[None, :] * s_pt + j * s_pj + rm[:, None], mask=mmask[:, None] & pv[None, :],
                        other=0.0)
            q = tl.load(q_ptr + tok[:, None] * s_qt + j * s_qj + rn[None, :], mask=pv[:, None] & nmask[None, :],
                        other=0.0)
            if P_GATED or Q_GATED:
                gate = tl.load(wt_ptr + tok * K + j, mask=pv, other=0.0) * scaling
                if P_GATED:
                    p = p * gate[None, :]
                    if LOW:
                        p = p.to(q_ptr.dtype.element_ty)
                if Q_GATED:
                    q = q * gate[:, None]
                    if LOW:
                        q = q.to(p_ptr.dtype.element_ty)
            acc = mma(p, q, acc)
    tl.store(c_ptr + e.to(tl.int64) * M * N + rm[:, None] * N + rn[None, :], acc, mask=mmask[:, None] & nmask[None, :])


def _rp(r: int) -> int:
    return pow2(r, 16)


def _shrink(srt: Sorted, src, mat, strides, z, R, epi, scaling, weights=None, dz=None, dw=None):
    T, K, E = srt.T, srt.K, srt.E
    G = K * E
    grid = (cdiv(T * K, srt.block_m) + min(G, T * K),)  # tiles <= full tiles + one partial per non-empty group
    dummy = z
    _grouped_shrink_kernel[grid](src, mat, srt.order, srt.seg, srt.tiles, z, weights if weights is not None else dummy,
                                 dz if dz is not None else dummy, dw if dw is not None else dummy,
                                 src.shape[1], E, R, K, G, scaling, src.stride(0), *strides, z.stride(0),
                                 NG_PAD=pow2(G), RP=_rp(R), EPI=epi, BLOCK_M=srt.block_m)


def _expand_passes(srt: Sorted, v, v_strides, mat, mat_strides, acc32, out, R, scaling, low, weights=None):
    """k launches: ``acc32[t] += V_slot @ M_e`` for choice j = 0..k-1; the last writes ``out``."""
    T, K, E = srt.T, srt.K, srt.E
    N = out.shape[1]
    tiles = cdiv(T, srt.block_m) + min(E, T)
    for j in range(K):
        dst = out if j == K - 1 else acc32
        grid = lambda meta: (tiles, cdiv(N, meta["BLOCK_N"]))  # noqa: E731
        _grouped_expand_kernel[grid](v, weights if weights is not None else v, mat, srt.order, srt.seg, srt.tiles,
                                     acc32, dst, N, E, R, K, j, scaling, *v_strides, *mat_strides, acc32.stride(0),
                                     dst.stride(0), E_PAD=pow2(E), RP=_rp(R), GATED=weights is not None,
                                     LOW=low, BLOCK_M=srt.block_m)
    return out


def _reduce(srt: Sorted, p, p_strides, q, q_strides, M, N, scaling, low, weights=None, gated="") -> torch.Tensor:
    E = srt.E
    out = torch.empty(E, M, N, dtype=torch.float32, device=p.device)
    grid = lambda meta: (E, cdiv(M, meta["BLOCK_M"]), cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    _grouped_reduce_kernel[grid](p, q, weights if weights is not None else p, srt.order, srt.seg, out, M, N, E, srt.K,
                                 scaling, *p_strides, *q_strides, P_GATED=gated == "p", Q_GATED=gated == "q", LOW=low)
    return out


def forward(x, weight, bias, router_weight, router_bias, lora_A, lora_B, shared_A, shared_B, lora_x, top_k,
            scaling, base_mode):
    """The contract's forward on the grouped path (see the module docstring)."""
    T, d_in = x.shape
    E, r, _ = lora_A.shape
    d_out = weight.shape[0]
    r_s = 0 if shared_A is None else shared_A.shape[0]
    L = Layout(E, r, r_s, top_k, False)
    hd = compute_dtype(x.dtype, lora_A.dtype, lora_B.dtype)
    lx = x if lora_x is None else lora_x
    logits, weights, indices, z, h = shrink_forward(x, lora_x, None, shared_A, router_weight, router_bias, L, scaling,
                                                    hd if r_s else None)
    y = torch.empty(T, d_out, dtype=x.dtype, device=x.device)
    if T == 0:
        return y, logits, weights, indices, z
    srt = Sorted(indices, E, _block_m())
    _shrink(srt, lx, lora_A, (lora_A.stride(0), lora_A.stride(1), lora_A.stride(2)), z, r, 0, scaling)
    acc = torch.empty(T, d_out, dtype=torch.float32, device=x.device)
    shared = dict(hz=h, shared=shared_B.T) if r_s else {}
    if base_mode == "cublas":
        acc.copy_(torch.nn.functional.linear(x, weight, bias))
        if r_s:
            ext_gemm(acc, layout=L, accumulate=True, **shared)
    else:
        ext_gemm(acc, a0=x, b0=weight.T, bias=bias, layout=L, **shared)
    _expand_passes(srt, z, (z.stride(0), r), lora_B, (lora_B.stride(0), lora_B.stride(2), lora_B.stride(1)), acc, y, r,
                   scaling, hd != torch.float32, weights)
    return y, logits, weights, indices, z


def backward(grad_y, grad_logits, x, lora_x, weight, router_weight, lora_A, lora_B, shared_A, shared_B, logits,
             weights, indices, z, top_k, scaling, needs):
    """The contract's 10 gradients on the grouped path."""
    need_x, need_w, need_b, need_wr, need_br, need_a, need_bb, need_as, need_bs, need_lx = needs
    T, d_in = x.shape
    E, r, _ = lora_A.shape
    d_out = weight.shape[0]
    r_s = 0 if shared_A is None else shared_A.shape[0]
    hd = compute_dtype(x.dtype, lora_A.dtype, lora_B.dtype)
    lx = x if lora_x is None else lora_x
    f32 = torch.float32
    d_x = d_wr = d_br = d_A = d_B = d_As = d_Bs = d_lx = None
    if T == 0:
        z0 = lambda t, need: torch.zeros_like(t) if need else None  # noqa: E731
        grads = [z0(x, need_x), None, None, z0(router_weight, need_wr),
                 torch.zeros(E, dtype=router_weight.dtype, device=x.device) if need_br else None,
                 z0(lora_A, need_a), z0(lora_B, need_bb), z0(shared_A, need_as and r_s), z0(shared_B, need_bs and r_s),
                 z0(lora_x, need_lx)]
    else:
        srt = Sorted(indices, E, _block_m())
        low = hd != torch.float32
        RP = _rp(r)
        dz = torch.empty(T, top_k, RP, dtype=hd, device=x.device)
        dw = torch.empty(T, top_k, dtype=f32, device=x.device)
        _shrink(srt, grad_y, lora_B, (lora_B.stride(0), lora_B.stride(2), lora_B.stride(1)), z, r, 1, scaling,
                weights, dz, dw)
        dl = troute.backward(dw, logits, weights, indices)
        if grad_logits is not None:
            dl += grad_logits
        Ls = Layout(1, 1, r_s, 1, False)
        dz_s = h_s = None
        if r_s:
            dz_s, h_s, _ = shrink_backward(grad_y, None, shared_B, None, None, z[:, top_k * r:], None, Ls, scaling, hd)
        A_strides = (lora_A.stride(0), lora_A.stride(1), lora_A.stride(2))
        dz_strides = (top_k * RP, RP)
        shared = dict(hz=dz_s, shared=shared_A) if r_s else {}
        if need_x:
            d_x = torch.empty_like(x)
            acc = torch.empty(T, d_in, dtype=f32, device=x.device)
            if lora_x is None:
                ext_gemm(acc, a0=grad_y, b0=weight, router=(dl, router_weight), layout=Ls, **shared)
                _expand_passes(srt, dz, dz_strides, lora_A, A_strides, acc, d_x, r, scaling, low)
            else:
                ext_gemm(d_x, a0=grad_y, b0=weight, router=(dl, router_weight), layout=Ls)
        if need_lx:
            d_lx = torch.empty_like(lora_x)
            acc = torch.empty(T, d_in, dtype=f32, device=x.device)
            ext_gemm(acc, layout=Ls, **shared)
            _expand_passes(srt, dz, dz_strides, lora_A, A_strides, acc, d_lx, r, scaling, low)
        if need_a:
            d_A = _reduce(srt, dz, dz_strides, lx, (lx.stride(0), 0), r, d_in, scaling, low).to(lora_A.dtype)
        if need_bb:
            d_B = _reduce(srt, grad_y, (grad_y.stride(0), 0), z, (z.stride(0), r), d_out, r, scaling, low, weights,
                          "q").to(lora_B.dtype)
        if need_as and r_s:
            d_As = token_reduce(dz_s, lx)[:r_s].to(shared_A.dtype)
        if need_bs and r_s:
            d_Bs = token_reduce(grad_y, h_s)[:, :r_s].to(shared_B.dtype)
        if need_wr:
            d_wr = token_reduce(dl, x).to(router_weight.dtype)
        if need_br:
            d_br = dl.sum(0).to(router_weight.dtype)
        grads = [d_x, None, None, d_wr, d_br, d_A, d_B, d_As, d_Bs, d_lx]
    grads[1] = (grad_y.T @ x).to(weight.dtype) if need_w else None
    grads[2] = grad_y.sum(0, dtype=f32).to(weight.dtype) if need_b else None
    return [None if g is None else g.contiguous() for g in grads]


def compile_cases(dt: str, f32: dict):
    """Kernels and constexprs for :mod:`medcare_kernels.backends.triton._compile_check` (MedCare-like E=64, r=16)."""
    ptr = dict(f32, order_ptr="*i32", seg_ptr="*i32", tiles_ptr="*i32", wt_ptr="*fp32", dw_ptr="*fp32",
               in_ptr="*fp32", c_ptr="*fp32")
    for epi in (0, 1):
        yield (f"grouped_shrink[epi={epi}]", _grouped_shrink_kernel, dict(NG_PAD=128, RP=16, EPI=epi, BLOCK_M=64),
               dict(ptr, z_ptr="*fp32"), None)
    for gated in (True, False):
        yield (f"grouped_expand[gated={gated}]", _grouped_expand_kernel,
               dict(E_PAD=64, RP=16, GATED=gated, LOW=True, BLOCK_M=64),
               dict(ptr, v_ptr="*fp32" if gated else f"*{dt}"), None)
    yield ("grouped_reduce[q gated]", _grouped_reduce_kernel, dict(P_GATED=False, Q_GATED=True, LOW=True),
           dict(ptr, q_ptr="*fp32"), None)
