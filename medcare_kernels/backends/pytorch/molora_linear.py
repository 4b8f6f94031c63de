"""MoLoRA linear in PyTorch: routing and gating in rank space, never an ``[E, T, d_out]`` tensor.

Two formulations of the same mathematics (docs/design.md, "Formulations"), chosen per shape by
:func:`medcare_kernels.dispatch.torch_formulation` (override: ``MEDCARE_MOLORA_FORMULATION=dense|grouped``):

* ``dense``: one thin GEMM ``x @ [A_all; A_s; W_r].T``, routing, the unchosen experts' rank columns
  zeroed, and one expand ``[H | H_s] @ [B_all | B_s].T`` added into the base output. Every expert's
  ``r`` columns take part in the expand and in the backward (``E*r + r_s`` wide GEMMs).
* ``grouped``: token slots sorted by expert; per expert segment, shrink ``x[tokens] @ A_e.T``, gate in
  rank space, expand ``@ B_e.T`` and add into ``y`` (``index_add_``); the same segments in the
  backward. Only the chosen experts' columns (``k*r``) are computed, at the price of row gathers and
  one host read of the per-expert token counts (a device synchronisation on CUDA).

Both save the same state for the backward: ``z`` [T, k*r + r_s], the chosen experts' shrink outputs in
slot order (token t, choice j), then the shared experts' shrink, plus the router logits and routing.
"""

from __future__ import annotations

import itertools
import threading

import torch

from medcare_kernels.dispatch import accumulate_dtype, torch_formulation
from medcare_kernels.backends.pytorch.route import backward as route_backward
from medcare_kernels.backends.pytorch.route import forward as route_forward

_local = threading.local()


def _workspace(slot: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable [rows, cols] scratch buffer: on the CPU kept between calls (per thread), grown on demand.

    On the CPU a fresh multi-megabyte allocation costs a page fault per 4 KiB on first touch, which
    for the per-expert buffers here costs as much as their GEMMs; CUDA's caching allocator needs no help.
    :func:`clear_workspaces` frees them.
    """
    if device.type != "cpu":
        return torch.empty(rows, cols, dtype=dtype, device=device)
    cache = _local.__dict__.setdefault("buffers", {})
    buf = cache.get((slot, dtype))
    if buf is None or buf.numel() < rows * cols:
        buf = cache[(slot, dtype)] = torch.empty(rows * cols, dtype=dtype)
    return buf[: rows * cols].view(rows, cols)


def clear_workspaces() -> None:
    """Free this thread's cached CPU scratch buffers."""
    _local.__dict__.pop("buffers", None)


class _Sorted:
    """Token slots ``(t, j)`` sorted by expert (stable): ``order`` [T*k] slot ids (``t*k + j``), ``tokens``
    [T*k] their tokens, and per expert ``(e, start, stop)`` for each non-empty segment. The segment
    sizes are read on the host (a device synchronisation on CUDA)."""

    def __init__(self, indices: torch.Tensor, experts: int):
        flat = indices.reshape(-1)
        self.order = flat.argsort(stable=True)
        self.tokens = self.order // indices.shape[1]
        counts = torch.bincount(flat, minlength=experts).tolist()
        ends = list(itertools.accumulate(counts))
        self.segments = [(e, end - n, end) for e, (n, end) in enumerate(zip(counts, ends)) if n]
        self.rows = max(counts, default=0)

    def gather(self, slot_values: torch.Tensor) -> torch.Tensor:
        """[T, k, ...] per-slot values -> [T*k, ...] in sorted order."""
        return slot_values.reshape(-1, *slot_values.shape[2:])[self.order]


def _cat_BT(lora_B: torch.Tensor, shared_B: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """[B_0 | ... | B_{E-1} | B_s].T as one contiguous [E*r + r_s, d_out] matrix (one copy of the B's).

    Row-major ``[K, d_out]`` is the operand layout CPU BLAS handles best for both the expand
    (``H @ BT``) and its backward (``dy @ BT.T``); a transposed view is several times slower at small K.
    """
    E, d_out, r = lora_B.shape
    routed = lora_B.to(dtype).transpose(1, 2).reshape(E * r, d_out)
    return routed if shared_B is None else torch.cat([routed, shared_B.to(dtype).T])


def _scatter_slots(values: torch.Tensor, indices: torch.Tensor, experts: int) -> torch.Tensor:
    """[T, k, r] slot values -> [T, E*r] with each slot at its expert's columns, zeros elsewhere."""
    T, k, r = values.shape
    out = torch.zeros(T, experts, r, dtype=values.dtype, device=values.device)
    return out.scatter_(1, indices[:, :, None].expand(T, k, r), values).view(T, experts * r)


def forward(x, weight, bias, router_weight, router_bias, lora_A, lora_B, shared_A, shared_B, lora_x,
            top_k: int, scaling: float):
    """x [T, d_in] -> (y [T, d_out] in x.dtype, logits [T, E], weights [T, k], indices [T, k], z).

    logits, weights and z [T, k*r + r_s] are float32 (float64 for float64 inputs); indices int64.
    """
    T, d_in = x.shape
    E, r, _ = lora_A.shape
    r_s = 0 if shared_A is None else shared_A.shape[0]
    acc = accumulate_dtype(x.dtype, lora_A.dtype, router_weight.dtype)
    xa = x.to(acc)
    lx = xa if lora_x is None else lora_x.to(acc)
    form = torch_formulation(T, E, r, top_k, x.device)

    # The thin GEMM over x: the shared shrink and the router, plus every expert's shrink when dense.
    lora_rows = ([lora_A.to(acc).reshape(E * r, d_in)] if form == "dense" else []) + (
        [shared_A.to(acc)] if r_s else [])
    n_lora = (E * r if form == "dense" else 0) + r_s
    if lora_x is None:
        thin = xa @ torch.cat(lora_rows + [router_weight.to(acc)]).T
        logits = thin[:, n_lora:]
    else:
        thin = lx @ torch.cat(lora_rows).T if lora_rows else None
        logits = xa @ router_weight.to(acc).T
    logits = (logits + router_bias.to(acc)) if router_bias is not None else logits.contiguous()
    weights, indices = route_forward(logits, top_k)
    gates = weights * scaling

    y = torch.nn.functional.linear(x, weight, bias).to(acc)
    z = torch.empty(T, top_k * r + r_s, dtype=acc, device=x.device)
    z_slots = z[:, : top_k * r].view(T, top_k, r)
    z_shared = thin[:, n_lora - r_s: n_lora] if r_s else None
    if r_s:
        z[:, top_k * r:] = z_shared
    if form == "dense":
        # One expand for routed and shared experts: [H | s*Z_s] @ [B_all | B_s].T, K = E*r + r_s.
        z_all = thin[:, : E * r].view(T, E, r)
        z_slots.copy_(z_all.gather(1, indices[:, :, None].expand(T, top_k, r)))
        h = _scatter_slots(z_slots * gates[:, :, None], indices, E)
        if r_s:
            h = torch.cat([h, z_shared * scaling], 1)
        y.addmm_(h, _cat_BT(lora_B, shared_B, acc))
    else:
        if r_s:
            y.addmm_(z_shared, shared_B.to(acc).T, alpha=scaling)
        srt = _Sorted(indices, E)
        gate_sorted = srt.gather(gates)[:, None]
        z_sorted = torch.empty(T * top_k, r, dtype=acc, device=x.device)
        # Workspaces reused by every segment: one allocation (and one round of page faults) per call.
        x_ws = _workspace("x", srt.rows, d_in, acc, x.device)
        y_ws = _workspace("y", srt.rows, weight.shape[0], acc, x.device)
        for e, a, b in srt.segments:
            tokens = srt.tokens[a:b]
            xe = torch.index_select(lx, 0, tokens, out=x_ws[: b - a])
            ze = torch.mm(xe, lora_A[e].to(acc).T, out=z_sorted[a:b])
            torch.mm(ze * gate_sorted[a:b], lora_B[e].to(acc).T, out=y_ws[: b - a])
            y.index_add_(0, tokens, y_ws[: b - a])
        z_slots[srt.tokens, srt.order % top_k] = z_sorted
    return y.to(x.dtype), logits, weights, indices, z


def backward(grad_y, grad_logits, x, lora_x, weight, router_weight, lora_A, lora_B, shared_A, shared_B,
             logits, weights, indices, z, top_k: int, scaling: float, needs):
    """Gradients for (x, weight, bias, router_weight, router_bias, lora_A, lora_B, shared_A, shared_B,
    lora_x): None where ``needs`` (same order) is False, else in that input's dtype (a bias in its
    weight's dtype). Experts that received no token get exact zero ``lora_A``/``lora_B`` gradients.
    """
    need_x, need_w, need_b, need_wr, need_br, need_a, need_bb, need_as, need_bs, need_lx = needs
    T, d_in = x.shape
    E, r, _ = lora_A.shape
    d_out = weight.shape[0]
    r_s = 0 if shared_A is None else shared_A.shape[0]
    acc = z.dtype
    dev = x.device
    dy = grad_y.to(acc)
    xa = x.to(acc)
    lx = xa if lora_x is None else lora_x.to(acc)
    gates = weights * scaling
    z_slots = z[:, : top_k * r].view(T, top_k, r)
    z_shared = z[:, top_k * r:]
    need_lora_in = need_lx or (lora_x is None and need_x)
    form = torch_formulation(T, E, r, top_k, dev)
    slot_index = indices[:, :, None].expand(T, top_k, r)

    # Rank space. d_weights: d loss / d gate weights. lora_blocks: (d loss / d shrink output [T, n],
    # the A rows [n, d_in]) pairs left for the thin GEMMs below; the grouped form handles its routed
    # experts' A gradients and d lora_x share per segment instead.
    d_weights = torch.empty(T, top_k, dtype=acc, device=dev)
    d_A = d_B = d_Bs = None
    d_lx = None
    lora_blocks: list[tuple[torch.Tensor, torch.Tensor]] = []
    if form == "dense":
        # dH = dy @ [B_all | B_s] and dB_cat = dy.T @ H: one GEMM each for routed and shared experts.
        dh = dy @ _cat_BT(lora_B, shared_B, acc).T
        dh_slots = dh[:, : E * r].view(T, E, r).gather(1, slot_index)
        d_weights.copy_((dh_slots * z_slots).sum(-1) * scaling)
        lora_blocks.append((_scatter_slots(dh_slots * gates[:, :, None], indices, E),
                            lora_A.to(acc).reshape(E * r, d_in)))
        if r_s:
            lora_blocks.append((dh[:, E * r:] * scaling, shared_A.to(acc)))
        if need_bb or (need_bs and r_s):
            h = _scatter_slots(z_slots * gates[:, :, None], indices, E)
            if r_s:
                h = torch.cat([h, z_shared * scaling], 1)
            d_cat = dy.T @ h  # [d_out, E*r + r_s]
            if need_bb:
                d_B = d_cat[:, : E * r].view(d_out, E, r).transpose(0, 1)
            if need_bs and r_s:
                d_Bs = d_cat[:, E * r:]
    else:
        # Written expert by expert; only experts that received no token are zeroed.
        d_A = torch.empty(E, r, d_in, dtype=acc, device=dev) if need_a else None
        d_B = torch.empty(E, d_out, r, dtype=acc, device=dev) if need_bb else None
        if need_lora_in:
            d_lx = torch.zeros(T, d_in, dtype=acc, device=dev)
        srt = _Sorted(indices, E)
        gate_sorted = srt.gather(gates)[:, None]
        z_sorted = srt.gather(z_slots)
        h_sorted = z_sorted * gate_sorted
        dh_sorted = torch.empty_like(z_sorted)
        dy_ws = _workspace("y", srt.rows, d_out, acc, dev)
        x_ws = _workspace("x", srt.rows, d_in, acc, dev)
        for e in set(range(E)) - {e for e, _, _ in srt.segments}:
            if need_a:
                d_A[e].zero_()
            if need_bb:
                d_B[e].zero_()
        for e, a, b in srt.segments:
            tokens = srt.tokens[a:b]
            dye = torch.index_select(dy, 0, tokens, out=dy_ws[: b - a])
            torch.mm(dye, lora_B[e].to(acc), out=dh_sorted[a:b])
            if need_bb:
                torch.mm(dye.T, h_sorted[a:b], out=d_B[e])
            if need_a or need_lora_in:
                dze = dh_sorted[a:b] * gate_sorted[a:b]
            if need_a:
                torch.mm(dze.T, torch.index_select(lx, 0, tokens, out=x_ws[: b - a]), out=d_A[e])
            if need_lora_in:
                d_lx.index_add_(0, tokens, torch.mm(dze, lora_A[e].to(acc), out=x_ws[: b - a]))
        d_weights.view(-1)[srt.order] = (dh_sorted * z_sorted).sum(-1) * scaling
        if r_s:
            lora_blocks.append(((dy @ shared_B.to(acc)) * scaling, shared_A.to(acc)))
            if need_bs:
                d_Bs = (dy.T @ z_shared) * scaling

    # The router, through the renormalised top-k weights, plus any gradient on the returned logits.
    d_logits = route_backward(d_weights, logits, weights, indices)
    if grad_logits is not None:
        d_logits = d_logits + grad_logits.to(acc)

    # Thin GEMMs back to d_in: all rank-space blocks that read the same input in one GEMM each way.
    blocks = lora_blocks + [(d_logits, router_weight.to(acc))] if lora_x is None else lora_blocks
    d_rows: list[torch.Tensor] = []
    if blocks:
        d_thin = torch.cat([b for b, _ in blocks], 1)
        if need_lora_in:
            back = d_thin @ torch.cat([rows for _, rows in blocks])
            d_lx = back if d_lx is None else d_lx.add_(back)
        if need_a or need_as or (lora_x is None and need_wr):
            d_rows = list(torch.split(d_thin.T @ lx, [b.shape[1] for b, _ in blocks]))
    routed_rows = 1 if form == "dense" else 0
    if need_a and form == "dense":
        d_A = d_rows[0].view(E, r, d_in)
    d_as = d_rows[routed_rows] if (need_as and r_s) else None
    d_wr = None
    if need_wr:
        d_wr = d_rows[-1] if lora_x is None else d_logits.T @ xa

    d_x = None
    if need_x:
        d_x = (grad_y @ weight).to(acc)
        if lora_x is None:
            d_x += d_lx
        else:
            d_x.addmm_(d_logits, router_weight.to(acc))
    grads = [
        d_x,
        (grad_y.T @ x) if need_w else None,
        dy.sum(0) if need_b else None,
        d_wr,
        d_logits.sum(0) if need_br else None,
        d_A,
        d_B,
        d_as,
        d_Bs,
        d_lx if need_lx else None,
    ]
    dtypes = [x.dtype, weight.dtype, weight.dtype, router_weight.dtype, router_weight.dtype,
              lora_A.dtype, lora_B.dtype, None if shared_A is None else shared_A.dtype,
              None if shared_B is None else shared_B.dtype, x.dtype]
    return [None if g is None else g.to(dt).contiguous() for g, dt in zip(grads, dtypes)]
