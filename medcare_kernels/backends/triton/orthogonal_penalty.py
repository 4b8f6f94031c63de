"""Orthogonal penalty in Triton: every layer's pair in ONE launch, forward and backward.

The layers' A matrices are packed into one flat buffer per argument (one copy each) with an offsets
table ``[offset_base, offset_orth, r1, r2, d]`` per layer (ragged ``d_l``: ``down_proj`` has the
intermediate size). Program ``l`` computes ``M_l = A_base_l @ A_orth_l.T`` (a ``[r1, r2]`` tile,
reducing over ``d_l``) and writes ``sum |M_l|``; the backward recomputes ``M_l`` and writes both
``g * sign(M_l) @ A_orth_l`` and ``g * sign(M_l).T @ A_base_l`` in a second pass over ``d_l``.
Each layer's whole ``r1 x r2`` tile lives in one program (LoRA ranks: 4 to 128).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from medcare_kernels.backends.triton._common import INTERPRET, check_dtypes, compute_dtype, mma, pow2

_META = 5


@triton.jit
def _pen_tile(base_ptr, orth_ptr, meta_ptr, layer, BR1: tl.constexpr, BR2: tl.constexpr, BK: tl.constexpr):
    ob = tl.load(meta_ptr + layer * 5 + 0)
    oo = tl.load(meta_ptr + layer * 5 + 1)
    r1 = tl.load(meta_ptr + layer * 5 + 2)
    r2 = tl.load(meta_ptr + layer * 5 + 3)
    d = tl.load(meta_ptr + layer * 5 + 4)
    i = tl.arange(0, BR1)
    j = tl.arange(0, BR2)
    ck = tl.arange(0, BK)
    acc = tl.zeros((BR1, BR2), tl.float32)
    for k0 in range(0, d, BK):
        kk = k0 + ck
        kv = kk < d
        a = tl.load(base_ptr + ob + i[:, None] * d + kk[None, :], mask=(i < r1)[:, None] & kv[None, :], other=0.0)
        b = tl.load(orth_ptr + oo + j[None, :] * d + kk[:, None], mask=kv[:, None] & (j < r2)[None, :], other=0.0)
        acc = mma(a, b, acc)
    return acc, ob, oo, r1, r2, d


@triton.jit
def _pen_fwd_kernel(base_ptr, orth_ptr, meta_ptr, out_ptr,
                    BR1: tl.constexpr, BR2: tl.constexpr, BK: tl.constexpr):
    layer = tl.program_id(0)
    acc, ob, oo, r1, r2, d = _pen_tile(base_ptr, orth_ptr, meta_ptr, layer, BR1, BR2, BK)
    tl.store(out_ptr + layer, tl.sum(tl.sum(tl.abs(acc), axis=1), axis=0))


@triton.jit
def _pen_bwd_kernel(base_ptr, orth_ptr, meta_ptr, g_ptr, d_base_ptr, d_orth_ptr,
                    NEED_BASE: tl.constexpr, NEED_ORTH: tl.constexpr,
                    BR1: tl.constexpr, BR2: tl.constexpr, BK: tl.constexpr):
    layer = tl.program_id(0)
    acc, ob, oo, r1, r2, d = _pen_tile(base_ptr, orth_ptr, meta_ptr, layer, BR1, BR2, BK)
    g = tl.load(g_ptr).to(tl.float32)
    s = tl.where(acc > 0.0, g, tl.where(acc < 0.0, -g, 0.0))
    i = tl.arange(0, BR1)
    j = tl.arange(0, BR2)
    ck = tl.arange(0, BK)
    for k0 in range(0, d, BK):
        kk = k0 + ck
        kv = kk < d
        if NEED_BASE:
            b = tl.load(orth_ptr + oo + j[:, None] * d + kk[None, :], mask=(j < r2)[:, None] & kv[None, :], other=0.0)
            db = mma(s, b, tl.zeros((BR1, BK), tl.float32))
            tl.store(d_base_ptr + ob + i[:, None] * d + kk[None, :], db, mask=(i < r1)[:, None] & kv[None, :])
        if NEED_ORTH:
            a = tl.load(base_ptr + ob + i[:, None] * d + kk[None, :], mask=(i < r1)[:, None] & kv[None, :], other=0.0)
            do = mma(tl.trans(s), a, tl.zeros((BR2, BK), tl.float32))
            tl.store(d_orth_ptr + oo + j[:, None] * d + kk[None, :], do, mask=(j < r2)[:, None] & kv[None, :])


_tables: dict[tuple, torch.Tensor] = {}


def _pack(base_A, orth_A):
    """Flat buffers (compute dtype), the per-layer offsets table (cached by shapes), tile sizes."""
    dtype = compute_dtype(*[t.dtype for t in list(base_A) + list(orth_A)])
    dev = base_A[0].device
    shapes = tuple((tuple(b.shape), tuple(o.shape)) for b, o in zip(base_A, orth_A))
    key = (shapes, str(dev))
    meta = _tables.get(key)
    if meta is None:
        rows, ob, oo = [], 0, 0
        for (r1, d), (r2, _) in shapes:
            rows.append([ob, oo, r1, r2, d])
            ob += r1 * d
            oo += r2 * d
        meta = _tables[key] = torch.tensor(rows, dtype=torch.int64, device=dev)
    base = torch.cat([t.reshape(-1).to(dtype) for t in base_A])
    orth = torch.cat([t.reshape(-1).to(dtype) for t in orth_A])
    br1 = pow2(max(s[0][0] for s in shapes), 16)
    br2 = pow2(max(s[1][0] for s in shapes), 16)
    bk = 16 if INTERPRET else (64 if br1 * br2 <= 64 * 64 else 32)
    return base, orth, meta, dict(BR1=br1, BR2=br2, BK=bk)


def forward(base_A, orth_A) -> torch.Tensor:
    """Lists of [r1_l, d_l] and [r2_l, d_l] -> 0-d float32 ``sum_l sum |A_base_l @ A_orth_l.T|``."""
    check_dtypes("orthogonal_penalty", **{f"base_A[{i}]": t for i, t in enumerate(base_A)},
                 **{f"orth_A[{i}]": t for i, t in enumerate(orth_A)})
    base, orth, meta, blocks = _pack(base_A, orth_A)
    partial = torch.empty(len(base_A), dtype=torch.float32, device=base.device)
    _pen_fwd_kernel[(len(base_A),)](base, orth, meta, partial, num_warps=4, **blocks)
    return partial.sum()


def backward(grad, base_A, orth_A, needs):
    """(grads for base_A, grads for orth_A), each list None where not needed, in the inputs' dtypes."""
    need_base, need_orth = needs
    base, orth, meta, blocks = _pack(base_A, orth_A)
    d_base = torch.empty(base.numel(), dtype=torch.float32, device=base.device) if need_base else base
    d_orth = torch.empty(orth.numel(), dtype=torch.float32, device=base.device) if need_orth else orth
    g = grad.reshape(1).to(torch.float32)
    _pen_bwd_kernel[(len(base_A),)](base, orth, meta, g, d_base, d_orth, NEED_BASE=bool(need_base),
                                    NEED_ORTH=bool(need_orth), num_warps=4, **blocks)

    def split(flat, tensors):
        out, off = [], 0
        for t in tensors:
            out.append(flat[off: off + t.numel()].view(t.shape).to(t.dtype))
            off += t.numel()
        return out

    return (split(d_base, base_A) if need_base else [None] * len(base_A),
            split(d_orth, orth_A) if need_orth else [None] * len(orth_A))
