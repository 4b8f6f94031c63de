"""Routing in Triton: one program per block of tokens does the float32 softmax over the experts, the
top-k (ties to the lower expert index), the renormalisation, and writes weights and indices; the
backward goes through the renormalisation and the softmax in the same tile.

The tile functions (:func:`softmax_rows`, :func:`topk_rank`, :func:`route_grad`) are also the routing
epilogue of the MoLoRA shrink kernels (:mod:`medcare_kernels.backends.triton.shrink`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from medcare_kernels.backends.triton._common import cdiv, check_dtypes, pow2


@triton.jit
def softmax_rows(logits, valid):
    """Row softmax of a float32 ``[BT, BE]`` tile over the columns where ``valid`` ([BE]); 0 elsewhere."""
    x = tl.where(valid[None, :], logits, float("-inf"))
    m = tl.max(x, axis=1)
    e = tl.exp(x - m[:, None])
    e = tl.where(valid[None, :], e, 0.0)
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def topk_rank(p, cols, valid, K):
    """``rank[t, e] = j`` when expert ``e`` is token ``t``'s ``j``-th choice (descending ``p``, equal values
    to the lower index), -1 when unchosen. ``p`` [BT, BE] float32, ``cols`` = arange(BE).

    A NaN probability (a row with a non-finite logit) ranks below every valid one, and ties with the
    padding columns go to the lower index, so such a row still gets k distinct valid experts: its
    weights are NaN, and the row stays poisoned instead of silently losing its LoRA term."""
    q = tl.where(valid[None, :] & (p == p), p, -1.0)
    rank = tl.full(p.shape, -1, tl.int32)
    for j in range(K):
        m = tl.max(q, axis=1)
        first = tl.min(tl.where(q == m[:, None], cols[None, :], 2147483647), axis=1)
        hit = cols[None, :] == first[:, None]
        rank = tl.where(hit, j, rank)
        q = tl.where(hit, -2.0, q)
    return rank


@triton.jit
def route_grad(p, chosen, d_w):
    """d loss / d logits [BT, BE] from ``d_w`` (d loss / d renormalised weight, per expert column, 0 for
    unchosen): ``w = p / S`` over the chosen experts, ``dq = (d_w - sum(d_w * w)) / S``,
    ``d logits = p * (dq - sum(p * dq))``."""
    s = tl.sum(tl.where(chosen, p, 0.0), axis=1)
    s = tl.where(s > 0.0, s, 1.0)  # rows past T (masked) choose nothing
    w = tl.where(chosen, p / s[:, None], 0.0)
    gw = tl.sum(d_w * w, axis=1)
    dq = tl.where(chosen, (d_w - gw[:, None]) / s[:, None], 0.0)
    return p * (dq - tl.sum(p * dq, axis=1)[:, None])


@triton.jit
def _block_probs(logits_ptr, T, E, s_lt, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """This program's block of tokens: ``(rt, ce, tmask, valid, p)``, its rows and expert columns with
    their masks, and the float32 softmax of its logits (0 in the padding columns)."""
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ce = tl.arange(0, BLOCK_E)
    tmask = rt < T
    valid = ce < E
    lg = tl.load(logits_ptr + rt[:, None] * s_lt + ce[None, :], mask=tmask[:, None] & valid[None, :], other=0.0)
    return rt, ce, tmask, valid, softmax_rows(lg.to(tl.float32), valid)


@triton.jit
def _route_fwd_kernel(logits_ptr, w_ptr, idx_ptr, T, E, K, s_lt,
                      BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    rt, ce, tmask, valid, p = _block_probs(logits_ptr, T, E, s_lt, BLOCK_T, BLOCK_E)
    rank = topk_rank(p, ce, valid, K)
    s = tl.sum(tl.where(rank >= 0, p, 0.0), axis=1)
    for j in range(K):
        sel = rank == j
        wj = tl.sum(tl.where(sel, p, 0.0), axis=1) / s
        ij = tl.sum(tl.where(sel, ce[None, :], 0), axis=1)
        tl.store(w_ptr + rt * K + j, wj, mask=tmask)
        tl.store(idx_ptr + rt * K + j, ij.to(tl.int64), mask=tmask)


@triton.jit
def _route_bwd_kernel(g_ptr, logits_ptr, idx_ptr, out_ptr, T, E, K, s_lt,
                      BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    rt, ce, tmask, valid, p = _block_probs(logits_ptr, T, E, s_lt, BLOCK_T, BLOCK_E)
    chosen = tl.zeros((BLOCK_T, BLOCK_E), tl.int1)
    d_w = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
    for j in range(K):
        ij = tl.load(idx_ptr + rt * K + j, mask=tmask, other=-1).to(tl.int32)
        gj = tl.load(g_ptr + rt * K + j, mask=tmask, other=0.0).to(tl.float32)
        sel = ce[None, :] == ij[:, None]
        chosen = chosen | sel
        d_w = tl.where(sel, gj[:, None], d_w)
    dl = route_grad(p, chosen, d_w)
    tl.store(out_ptr + rt[:, None] * E + ce[None, :], dl, mask=tmask[:, None] & valid[None, :])


def _block_t(E: int) -> int:
    return max(1, min(64, 4096 // pow2(E)))


def forward(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] (float16/bfloat16/float32) -> (weights [T, k] float32, indices [T, k] int64)."""
    check_dtypes("route", logits=logits)
    T, E = logits.shape
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    indices = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    if T:
        bt = _block_t(E)
        _route_fwd_kernel[(cdiv(T, bt),)](logits, weights, indices, T, E, top_k, logits.stride(0),
                                          BLOCK_T=bt, BLOCK_E=pow2(E))
    return weights, indices


def backward(grad_weights: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor,
             indices: torch.Tensor) -> torch.Tensor:
    """d loss / d logits [T, E] float32 from d loss / d weights [T, k] (recomputes the softmax)."""
    check_dtypes("route", logits=logits)
    T, E = logits.shape
    out = torch.empty(T, E, dtype=torch.float32, device=logits.device)
    if T:
        bt = _block_t(E)
        _route_bwd_kernel[(cdiv(T, bt),)](grad_weights.contiguous(), logits, indices, out, T, E,
                                          indices.shape[1], logits.stride(0), BLOCK_T=bt, BLOCK_E=pow2(E))
    return out
