"""The thin GEMMs over the long input dimension, with the routing fused into their epilogues.

Forward (:func:`shrink_forward`): one pass over ``x`` [T, d_in] computes, per block of tokens, the three
accumulators ``lx @ A_all.T`` (every expert's rank columns), ``lx @ A_s.T`` (shared) and
``x @ W_r.T`` (router), i.e. ``x @ [A_all; A_s; W_r].T``; the epilogue adds the router bias, does the
float32 softmax / top-k / renormalisation, and writes the router logits, the weights and indices, ``z``
(the chosen experts' shrink outputs in slot order, then the shared shrink: the backend contract) and
``H`` [T, W]: the rank-space activations scaled by ``scaling * weight`` with the unchosen experts'
columns zeroed, ready for the expand (:mod:`medcare_kernels.backends.triton.gemm`).

Backward (:func:`shrink_backward`): one pass over ``dy`` [T, d_out] computes ``dy @ [B_all | B_s]``; the
epilogue gathers each slot's ``dh``, forms the gate-weight gradients ``s * <dh_j, z_j>``, goes back
through the renormalisation and the softmax (the router's logit gradient), and writes ``dZ`` (the
gated rank-space gradient, unchosen experts exactly zero) and ``H`` again (recomputed from ``z``).

Layout of ``H`` [T, W] / ``dZ`` [T, WZ]: expert ``e``'s rank column ``c`` at ``e * R_PAD + c`` (``R_PAD`` = r
rounded up to a power of two, experts padded to ``E_R``), then the shared columns at ``E_R * R_PAD``.
Padding columns hold exact zeros. ``dZ`` appends the router's logit gradient.

Split-K: with few token blocks (decode) the reduction is split into ``SPLIT`` slices that write float32
partials; a second small kernel sums them and runs the same epilogue. The split and the token block
are chosen on the host from the shape (no data dependence, no synchronisation); BLOCK_K, warps and
stages are autotuned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from medcare_kernels.backends.triton._common import autotune, bucket, cdiv, cfg, mma, num_sms, pow2, split_k
from medcare_kernels.backends.triton.route import route_grad, softmax_rows, topk_rank

# Hopper and Ampere: BLOCK_T comes from the host (16/32/64 by token count), the rank side is the
# whole padded width (<= a few hundred columns); only the reduction tile and the pipeline vary.
_CONFIGS = [cfg(w, s, BLOCK_K=bk) for bk in (32, 64, 128) for w, s in ((4, 3), (4, 4), (8, 3))]
_INTERP_CFG = cfg(4, 1, BLOCK_K=16)


@dataclass(frozen=True)
class Layout:
    """Padded sizes of the rank-space buffers for E experts of rank r, r_s shared columns, top-k."""

    E: int
    R: int
    RS: int
    K: int
    routed: bool  # the routed experts' shrink is computed here (dense-masked); False: router only

    @property
    def E_R(self) -> int:
        return pow2(self.E)

    @property
    def R_PAD(self) -> int:
        return pow2(self.R, 16 // self.E_R if self.E_R < 16 else 1)

    @property
    def WR(self) -> int:
        return self.E_R * self.R_PAD if self.routed else 0

    @property
    def RS_PAD(self) -> int:
        return pow2(self.RS, 16)

    @property
    def W(self) -> int:
        """Width of H and dZ."""
        return self.WR + (self.RS_PAD if self.RS else 0)

    @property
    def WZ(self) -> int:
        """Width of dZ: H's columns, then (routed layouts) d_logits in ``EL`` columns."""
        return self.W + (self.EL if self.routed else 0)

    @property
    def EL(self) -> int:
        return pow2(self.E, 16)

    @property
    def WS(self) -> int:
        """Width of a split-K partial row: routed, shared, router accumulators."""
        return self.E_R * self.R_PAD + self.RS_PAD + self.EL


def _block_t(T: int, device: torch.device) -> int:
    """The token block: the largest of 128/64/32/16 that still gives every SM a tile, so prefill sizes
    need no split-K and no reduce pass (T=16384 on an H200's 132 SMs: 64, 256 tiles, where 128 gave 128
    tiles and a 3-way split; benchmarks/RESULTS.md, "Where the time goes"). Larger blocks re-read the
    small rank-space weights from L2 fewer times. Decode sizes take 16 and split the reduction instead."""
    from medcare_kernels.backends.triton._common import INTERPRET
    if INTERPRET:
        return 16
    sms = num_sms(device)
    return next((bt for bt in (128, 64, 32) if cdiv(T, bt) >= sms), 16)


# ----------------------------------------------------------------------------------------------------
# the tile of a shrink program (forward and backward)


@triton.jit
def _tile(T, D, SPLIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's block of tokens and slice of the reduction over ``D`` (grid: token blocks x SPLIT):
    ``(pid_k, rt, tmask, rt64, ck, k_lo, per)``; the slice is ``range(k_lo, k_lo + per, BLOCK_K)``."""
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    rt = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = rt < T
    rt64 = rt.to(tl.int64)
    ck = tl.arange(0, BLOCK_K)
    per = tl.cdiv(tl.cdiv(D, BLOCK_K), SPLIT) * BLOCK_K  # this program's slice of the reduction
    k_lo = pid_k * per
    return pid_k, rt, tmask, rt64, ck, k_lo, per


@triton.jit
def _store_partial(ws_ptr, acc, pid_k, rt64, tmask, T, WS, OFF: tl.constexpr, WIDTH: tl.constexpr):
    """Write one accumulator's float32 split-K partial (summed by :func:`_load_partials`)."""
    c = tl.arange(0, WIDTH)
    tl.store(ws_ptr + pid_k.to(tl.int64) * T * WS + rt64[:, None] * WS + OFF + c[None, :], acc, mask=tmask[:, None])


# ----------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_epilogue(acc_r, acc_s, acc_l, rt, tmask,
                  br_ptr, logits_ptr, w_ptr, idx_ptr, z_ptr, h_ptr,
                  E, R, RS, TOPK, scaling, s_zt, s_ht, Z_SHARED,
                  E_R: tl.constexpr, R_PAD: tl.constexpr, RS_PAD: tl.constexpr, WR: tl.constexpr, EL: tl.constexpr,
                  ROUTED: tl.constexpr, SHARED: tl.constexpr, ROUTER: tl.constexpr, HAS_RBIAS: tl.constexpr,
                  WRITE_H: tl.constexpr, BLOCK_T: tl.constexpr):
    rt64 = rt.to(tl.int64)
    if ROUTER:
        cl = tl.arange(0, EL)
        lg = acc_l
        if HAS_RBIAS:
            lg += tl.load(br_ptr + cl, mask=cl < E, other=0.0).to(tl.float32)[None, :]
        tl.store(logits_ptr + rt64[:, None] * E + cl[None, :], lg, mask=tmask[:, None] & (cl < E)[None, :])
        if EL > E_R:  # fold the >= 16 wide dot result to the E_R routing columns (the rest is zero)
            lg_r = tl.sum(tl.reshape(lg, (BLOCK_T, EL // E_R, E_R)), axis=1)
        else:
            lg_r = lg
        ce = tl.arange(0, E_R)
        valid = ce < E
        p = softmax_rows(lg_r, valid)
        rank = topk_rank(p, ce, valid, TOPK)
        chosen = rank >= 0
        s = tl.sum(tl.where(chosen, p, 0.0), axis=1)
        w_exp = tl.where(chosen, p / s[:, None], 0.0)
        for j in range(TOPK):
            sel = rank == j
            tl.store(w_ptr + rt64 * TOPK + j, tl.sum(tl.where(sel, w_exp, 0.0), axis=1), mask=tmask)
            tl.store(idx_ptr + rt64 * TOPK + j, tl.sum(tl.where(sel, ce[None, :], 0), axis=1).to(tl.int64),
                     mask=tmask)
        if ROUTED:
            acc3 = tl.reshape(acc_r, (BLOCK_T, E_R, R_PAD))
            cr = tl.arange(0, R_PAD)
            for j in range(TOPK):
                sel = rank == j
                zj = tl.sum(tl.where(sel[:, :, None], acc3, 0.0), axis=1)
                tl.store(z_ptr + rt64[:, None] * s_zt + j * R + cr[None, :], zj,
                         mask=tmask[:, None] & (cr < R)[None, :])
            if WRITE_H:
                h = tl.reshape(acc3 * (w_exp * scaling)[:, :, None], (BLOCK_T, E_R * R_PAD))
                cw = tl.arange(0, E_R * R_PAD)
                tl.store(h_ptr + rt64[:, None] * s_ht + cw[None, :], h.to(h_ptr.dtype.element_ty),
                         mask=tmask[:, None])
    if SHARED:
        cs = tl.arange(0, RS_PAD)
        tl.store(z_ptr + rt64[:, None] * s_zt + Z_SHARED + cs[None, :], acc_s,
                 mask=tmask[:, None] & (cs < RS)[None, :])
        if WRITE_H:
            tl.store(h_ptr + rt64[:, None] * s_ht + WR + cs[None, :],
                     (acc_s * scaling).to(h_ptr.dtype.element_ty), mask=tmask[:, None])


@autotune(_CONFIGS, _INTERP_CFG, key=["D", "T_BUCKET", "E", "R", "RS", "SPLIT", "ROUTED", "SHARED", "ROUTER"])
@triton.jit
def _shrink_fwd_kernel(x_ptr, lx_ptr, a_ptr, as_ptr, wr_ptr, br_ptr,
                       logits_ptr, w_ptr, idx_ptr, z_ptr, h_ptr, ws_ptr,
                       T, D, E, R, RS, TOPK, scaling, T_BUCKET,
                       s_xt, s_lxt, s_zt, s_ht, Z_SHARED, WS,
                       E_R: tl.constexpr, R_PAD: tl.constexpr, RS_PAD: tl.constexpr, WR: tl.constexpr, EL: tl.constexpr,
                       ROUTED: tl.constexpr, SHARED: tl.constexpr, ROUTER: tl.constexpr, HAS_LX: tl.constexpr,
                       HAS_RBIAS: tl.constexpr, WRITE_H: tl.constexpr, SPLIT: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_k, rt, tmask, rt64, ck, k_lo, per = _tile(T, D, SPLIT, BLOCK_T, BLOCK_K)
    # A_all [E, r, d_in] read as [d_in, (e, c)]; A_s [r_s, d_in]; W_r [E, d_in].
    nr = tl.arange(0, E_R * R_PAD)
    er = nr // R_PAD
    cr = nr % R_PAD
    a_off = er * (R * D) + cr * D
    a_val = (er < E) & (cr < R)
    cs = tl.arange(0, RS_PAD)
    cl = tl.arange(0, EL)
    acc_r = tl.zeros((BLOCK_T, E_R * R_PAD), tl.float32)
    acc_s = tl.zeros((BLOCK_T, RS_PAD), tl.float32)
    acc_l = tl.zeros((BLOCK_T, EL), tl.float32)
    for k0 in range(k_lo, k_lo + per, BLOCK_K):
        kk = k0 + ck
        kv = kk < D
        lxt = tl.load(lx_ptr + rt64[:, None] * s_lxt + kk[None, :], mask=tmask[:, None] & kv[None, :], other=0.0)
        if ROUTED:
            at = tl.load(a_ptr + a_off[None, :] + kk[:, None], mask=kv[:, None] & a_val[None, :], other=0.0)
            acc_r = mma(lxt, at, acc_r)
        if SHARED:
            st = tl.load(as_ptr + cs[None, :] * D + kk[:, None], mask=kv[:, None] & (cs < RS)[None, :], other=0.0)
            acc_s = mma(lxt, st, acc_s)
        if ROUTER:
            if HAS_LX:
                xt = tl.load(x_ptr + rt64[:, None] * s_xt + kk[None, :], mask=tmask[:, None] & kv[None, :],
                             other=0.0)
            else:
                xt = lxt
            wt = tl.load(wr_ptr + cl[None, :] * D + kk[:, None], mask=kv[:, None] & (cl < E)[None, :], other=0.0)
            acc_l = mma(xt, wt, acc_l)
    if SPLIT > 1:
        if ROUTED:
            _store_partial(ws_ptr, acc_r, pid_k, rt64, tmask, T, WS, 0, E_R * R_PAD)
        if SHARED:
            _store_partial(ws_ptr, acc_s, pid_k, rt64, tmask, T, WS, E_R * R_PAD, RS_PAD)
        if ROUTER:
            _store_partial(ws_ptr, acc_l, pid_k, rt64, tmask, T, WS, E_R * R_PAD + RS_PAD, EL)
    else:
        _fwd_epilogue(acc_r, acc_s, acc_l, rt, tmask, br_ptr, logits_ptr, w_ptr, idx_ptr, z_ptr, h_ptr,
                      E, R, RS, TOPK, scaling, s_zt, s_ht, Z_SHARED, E_R, R_PAD, RS_PAD, WR, EL,
                      ROUTED, SHARED, ROUTER, HAS_RBIAS, WRITE_H, BLOCK_T)


@triton.jit
def _load_partials(ws_ptr, rt, tmask, T, WS, SPLIT, OFF: tl.constexpr, WIDTH: tl.constexpr, USED: tl.constexpr,
                   BLOCK_T: tl.constexpr):
    """The sum of the SPLIT float32 partials of one accumulator (zeros for an accumulator not in use)."""
    c = tl.arange(0, WIDTH)
    acc = tl.zeros((BLOCK_T, WIDTH), tl.float32)
    for s in range(SPLIT if USED else 0):
        acc += tl.load(ws_ptr + s * T * WS + rt.to(tl.int64)[:, None] * WS + OFF + c[None, :], mask=tmask[:, None],
                       other=0.0)
    return acc


@triton.jit
def _shrink_fwd_reduce_kernel(br_ptr, logits_ptr, w_ptr, idx_ptr, z_ptr, h_ptr, ws_ptr,
                              T, E, R, RS, TOPK, scaling, s_zt, s_ht, Z_SHARED, WS, SPLIT,
                              E_R: tl.constexpr, R_PAD: tl.constexpr, RS_PAD: tl.constexpr, WR: tl.constexpr,
                              EL: tl.constexpr,
                              ROUTED: tl.constexpr, SHARED: tl.constexpr, ROUTER: tl.constexpr,
                              HAS_RBIAS: tl.constexpr, WRITE_H: tl.constexpr, BLOCK_T: tl.constexpr):
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = rt < T
    acc_r = _load_partials(ws_ptr, rt, tmask, T, WS, SPLIT, 0, E_R * R_PAD, ROUTED, BLOCK_T)
    acc_s = _load_partials(ws_ptr, rt, tmask, T, WS, SPLIT, E_R * R_PAD, RS_PAD, SHARED, BLOCK_T)
    acc_l = _load_partials(ws_ptr, rt, tmask, T, WS, SPLIT, E_R * R_PAD + RS_PAD, EL, ROUTER, BLOCK_T)
    _fwd_epilogue(acc_r, acc_s, acc_l, rt, tmask, br_ptr, logits_ptr, w_ptr, idx_ptr, z_ptr, h_ptr,
                  E, R, RS, TOPK, scaling, s_zt, s_ht, Z_SHARED, E_R, R_PAD, RS_PAD, WR, EL,
                  ROUTED, SHARED, ROUTER, HAS_RBIAS, WRITE_H, BLOCK_T)


def shrink_forward(x, lora_x, lora_A, shared_A, router_weight, router_bias, layout: Layout, scaling: float,
                   h_dtype: torch.dtype | None):
    """Returns ``(logits [T, E] f32 | None, weights [T, k] f32 | None, indices [T, k] i64 | None,
    z [T, k*r + r_s] f32 (routed slots filled only when ``layout.routed``), H [T, W] | None)``.

    ``lora_A`` [E, r, d_in] is read only when ``layout.routed``; ``router_weight`` None means no router
    (plain LoRA: then ``shared_A`` is the LoRA's A and ``z`` is [T, r_s]). ``h_dtype`` None: no H.
    """
    T, D = x.shape
    lx = x if lora_x is None else lora_x
    dev = x.device
    L = layout
    router = router_weight is not None
    f32 = torch.float32
    logits = torch.empty(T, L.E, dtype=f32, device=dev) if router else None
    weights = torch.empty(T, L.K, dtype=f32, device=dev) if router else None
    indices = torch.empty(T, L.K, dtype=torch.int64, device=dev) if router else None
    z_shared = L.K * L.R if router else 0
    z = torch.empty(T, z_shared + L.RS, dtype=f32, device=dev)
    h = torch.empty(T, L.W, dtype=h_dtype, device=dev) if h_dtype is not None else None
    if T == 0:
        return logits, weights, indices, z, h
    bt = _block_t(T, dev)
    tiles = cdiv(T, bt)
    split = split_k(tiles, D, dev, min_chunk=256)
    ws = torch.empty(split, T, L.WS, dtype=f32, device=dev) if split > 1 else z
    dummy = z
    args = dict(E_R=L.E_R, R_PAD=L.R_PAD, RS_PAD=L.RS_PAD, WR=L.WR, EL=L.EL, ROUTED=L.routed, SHARED=L.RS > 0,
                ROUTER=router, HAS_RBIAS=router_bias is not None, WRITE_H=h is not None)
    outs = (logits if router else dummy, weights if router else dummy, indices if router else dummy, z,
            h if h is not None else dummy)
    _shrink_fwd_kernel[(tiles, split)](
        x, lx, lora_A if L.routed else dummy, shared_A if L.RS else dummy, router_weight if router else dummy,
        router_bias if router_bias is not None else dummy, *outs, ws,
        T, D, L.E, L.R, L.RS, L.K, scaling, bucket(T),
        x.stride(0), lx.stride(0), z.stride(0), h.stride(0) if h is not None else 0, z_shared, L.WS,
        HAS_LX=lora_x is not None and router, SPLIT=split, BLOCK_T=bt, **args)
    if split > 1:
        _shrink_fwd_reduce_kernel[(tiles,)](
            router_bias if router_bias is not None else dummy, *outs, ws,
            T, L.E, L.R, L.RS, L.K, scaling, z.stride(0), h.stride(0) if h is not None else 0, z_shared, L.WS,
            split, BLOCK_T=bt, **args)
    return logits, weights, indices, z, h


# ----------------------------------------------------------------------------------------------------
# backward


@triton.jit
def _bwd_epilogue(acc_r, acc_s, rt, tmask,
                  logits_ptr, idx_ptr, z_ptr, gl_ptr, dz_ptr, h_ptr, dl_ptr,
                  E, R, RS, TOPK, scaling, s_zt, Z_SHARED, W, WZ,
                  E_R: tl.constexpr, R_PAD: tl.constexpr, RS_PAD: tl.constexpr, WR: tl.constexpr,
                  ROUTED: tl.constexpr, SHARED: tl.constexpr, HAS_GL: tl.constexpr, BLOCK_T: tl.constexpr):
    rt64 = rt.to(tl.int64)
    if ROUTED:
        ce = tl.arange(0, E_R)
        valid = ce < E
        lg = tl.load(logits_ptr + rt64[:, None] * E + ce[None, :], mask=tmask[:, None] & valid[None, :], other=0.0)
        p = softmax_rows(lg, valid)
        dh3 = tl.reshape(acc_r, (BLOCK_T, E_R, R_PAD))
        cr = tl.arange(0, R_PAD)
        chosen = tl.zeros((BLOCK_T, E_R), tl.int1)
        d_w = tl.zeros((BLOCK_T, E_R), tl.float32)
        z3 = tl.zeros((BLOCK_T, E_R, R_PAD), tl.float32)
        for j in range(TOPK):
            ij = tl.load(idx_ptr + rt64 * TOPK + j, mask=tmask, other=-1).to(tl.int32)
            zj = tl.load(z_ptr + rt64[:, None] * s_zt + j * R + cr[None, :], mask=tmask[:, None] & (cr < R)[None, :],
                         other=0.0)
            sel = ce[None, :] == ij[:, None]
            dhj = tl.sum(tl.where(sel[:, :, None], dh3, 0.0), axis=1)
            d_w = tl.where(sel, (tl.sum(dhj * zj, axis=1) * scaling)[:, None], d_w)
            chosen = chosen | sel
            z3 = tl.where(sel[:, :, None], zj[:, None, :], z3)
        s = tl.sum(tl.where(chosen, p, 0.0), axis=1)
        s = tl.where(s > 0.0, s, 1.0)
        gate = (tl.where(chosen, p / s[:, None], 0.0) * scaling)[:, :, None]
        cw = tl.arange(0, E_R * R_PAD)
        tl.store(dz_ptr + rt64[:, None] * WZ + cw[None, :],
                 tl.reshape(dh3 * gate, (BLOCK_T, E_R * R_PAD)).to(dz_ptr.dtype.element_ty), mask=tmask[:, None])
        tl.store(h_ptr + rt64[:, None] * W + cw[None, :],
                 tl.reshape(z3 * gate, (BLOCK_T, E_R * R_PAD)).to(h_ptr.dtype.element_ty), mask=tmask[:, None])
        dl = route_grad(p, chosen, d_w)
        if HAS_GL:
            dl += tl.load(gl_ptr + rt64[:, None] * E + ce[None, :], mask=tmask[:, None] & valid[None, :], other=0.0)
        tl.store(dl_ptr + rt64[:, None] * E + ce[None, :], dl, mask=tmask[:, None] & valid[None, :])
        tl.store(dz_ptr + rt64[:, None] * WZ + W + ce[None, :], dl.to(dz_ptr.dtype.element_ty),
                 mask=tmask[:, None] & valid[None, :])
    if SHARED:
        cs = tl.arange(0, RS_PAD)
        zs = tl.load(z_ptr + rt64[:, None] * s_zt + Z_SHARED + cs[None, :], mask=tmask[:, None] & (cs < RS)[None, :],
                     other=0.0)
        tl.store(dz_ptr + rt64[:, None] * WZ + WR + cs[None, :], (acc_s * scaling).to(dz_ptr.dtype.element_ty),
                 mask=tmask[:, None])
        tl.store(h_ptr + rt64[:, None] * W + WR + cs[None, :], (zs * scaling).to(h_ptr.dtype.element_ty),
                 mask=tmask[:, None])


@autotune(_CONFIGS, _INTERP_CFG, key=["D", "T_BUCKET", "E", "R", "RS", "SPLIT", "ROUTED", "SHARED"])
@triton.jit
def _shrink_bwd_kernel(dy_ptr, b_ptr, bs_ptr, logits_ptr, idx_ptr, z_ptr, gl_ptr, dz_ptr, h_ptr, dl_ptr, ws_ptr,
                       T, D, E, R, RS, TOPK, scaling, T_BUCKET, s_dyt, s_zt, Z_SHARED, W, WZ, WS,
                       E_R: tl.constexpr, R_PAD: tl.constexpr, RS_PAD: tl.constexpr, WR: tl.constexpr, EL: tl.constexpr,
                       ROUTED: tl.constexpr, SHARED: tl.constexpr, HAS_GL: tl.constexpr, SPLIT: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_k, rt, tmask, rt64, ck, k_lo, per = _tile(T, D, SPLIT, BLOCK_T, BLOCK_K)
    # B_all [E, d_out, r] read as [d_out, (e, c)]; B_s [d_out, r_s].
    nr = tl.arange(0, E_R * R_PAD)
    er = nr // R_PAD
    cr = nr % R_PAD
    b_off = er * (D * R) + cr
    b_val = (er < E) & (cr < R)
    cs = tl.arange(0, RS_PAD)
    acc_r = tl.zeros((BLOCK_T, E_R * R_PAD), tl.float32)
    acc_s = tl.zeros((BLOCK_T, RS_PAD), tl.float32)
    for k0 in range(k_lo, k_lo + per, BLOCK_K):
        kk = k0 + ck
        kv = kk < D
        dyt = tl.load(dy_ptr + rt64[:, None] * s_dyt + kk[None, :], mask=tmask[:, None] & kv[None, :], other=0.0)
        if ROUTED:
            bt = tl.load(b_ptr + b_off[None, :] + kk[:, None] * R, mask=kv[:, None] & b_val[None, :], other=0.0)
            acc_r = mma(dyt, bt, acc_r)
        if SHARED:
            st = tl.load(bs_ptr + kk[:, None] * RS + cs[None, :], mask=kv[:, None] & (cs < RS)[None, :], other=0.0)
            acc_s = mma(dyt, st, acc_s)
    if SPLIT > 1:
        if ROUTED:
            _store_partial(ws_ptr, acc_r, pid_k, rt64, tmask, T, WS, 0, E_R * R_PAD)
        if SHARED:
            _store_partial(ws_ptr, acc_s, pid_k, rt64, tmask, T, WS, E_R * R_PAD, RS_PAD)
    else:
        _bwd_epilogue(acc_r, acc_s, rt, tmask, logits_ptr, idx_ptr, z_ptr, gl_ptr, dz_ptr, h_ptr, dl_ptr,
                      E, R, RS, TOPK, scaling, s_zt, Z_SHARED, W, WZ, E_R, R_PAD, RS_PAD, WR, ROUTED, SHARED, HAS_GL,
                      BLOCK_T)


@triton.jit
def _shrink_bwd_reduce_kernel(logits_ptr, idx_ptr, z_ptr, gl_ptr, dz_ptr, h_ptr, dl_ptr, ws_ptr,
                              T, E, R, RS, TOPK, scaling, s_zt, Z_SHARED, W, WZ, WS, SPLIT,
                              E_R: tl.constexpr, R_PAD: tl.constexpr, RS_PAD: tl.constexpr, WR: tl.constexpr,
                              ROUTED: tl.constexpr, SHARED: tl.constexpr, HAS_GL: tl.constexpr,
                              BLOCK_T: tl.constexpr):
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = rt < T
    acc_r = _load_partials(ws_ptr, rt, tmask, T, WS, SPLIT, 0, E_R * R_PAD, ROUTED, BLOCK_T)
    acc_s = _load_partials(ws_ptr, rt, tmask, T, WS, SPLIT, E_R * R_PAD, RS_PAD, SHARED, BLOCK_T)
    _bwd_epilogue(acc_r, acc_s, rt, tmask, logits_ptr, idx_ptr, z_ptr, gl_ptr, dz_ptr, h_ptr, dl_ptr,
                  E, R, RS, TOPK, scaling, s_zt, Z_SHARED, W, WZ, E_R, R_PAD, RS_PAD, WR, ROUTED, SHARED, HAS_GL,
                  BLOCK_T)


def shrink_backward(grad_y, lora_B, shared_B, logits, indices, z, grad_logits, layout: Layout, scaling: float,
                    dz_dtype: torch.dtype):
    """``dy @ [B_all | B_s]`` with the routing backward fused: returns ``(dZ [T, WZ], H [T, W] (both
    ``dz_dtype``), d_logits [T, E] float32 | None)``. ``d_logits`` includes ``grad_logits`` when given;
    a routed layout also stores it (in ``dz_dtype``) in dZ's last ``EL`` columns, so that one token
    reduction over ``x`` gives ``dA``, ``dA_s`` and ``dW_r`` together.

    ``lora_B`` [E, d_out, r] is read only when ``layout.routed``; for a plain LoRA pass ``logits`` None
    and the LoRA's B as ``shared_B`` (``z`` is then [T, r]).
    """
    T, D = grad_y.shape
    L = layout
    dev = grad_y.device
    dz = torch.empty(T, L.WZ, dtype=dz_dtype, device=dev)
    h = torch.empty(T, L.W, dtype=dz_dtype, device=dev)
    dl = torch.empty(T, L.E, dtype=torch.float32, device=dev) if L.routed else None
    if T == 0:
        return dz, h, dl
    bt = _block_t(T, dev)
    tiles = cdiv(T, bt)
    split = split_k(tiles, D, dev, min_chunk=256)
    ws = torch.empty(split, T, L.WS, dtype=torch.float32, device=dev) if split > 1 else dz
    z_shared = L.K * L.R if L.routed else 0
    dummy = z
    args = dict(E_R=L.E_R, R_PAD=L.R_PAD, RS_PAD=L.RS_PAD, WR=L.WR, ROUTED=L.routed, SHARED=L.RS > 0,
                HAS_GL=grad_logits is not None, BLOCK_T=bt)
    ptrs = (logits if L.routed else dummy, indices if L.routed else dummy, z,
            grad_logits if grad_logits is not None else dummy, dz, h, dl if dl is not None else dummy)
    _shrink_bwd_kernel[(tiles, split)](
        grad_y, lora_B if L.routed else dummy, shared_B if L.RS else dummy, *ptrs, ws,
        T, D, L.E, L.R, L.RS, L.K, scaling, bucket(T), grad_y.stride(0), z.stride(0), z_shared, L.W, L.WZ, L.WS,
        EL=L.EL, SPLIT=split, **args)
    if split > 1:
        _shrink_bwd_reduce_kernel[(tiles,)](*ptrs, ws, T, L.E, L.R, L.RS, L.K, scaling, z.stride(0), z_shared,
                                            L.W, L.WZ, L.WS, split, **args)
    return dz, h, dl
