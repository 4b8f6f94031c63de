"""MoLoRA linear in PyTorch: routing and gating in rank space, never an ``[E, T, d_out]`` tensor.

Two formulations of the same mathematics (docs/design.md, "The formulations"), chosen per shape by
:func:`medcare_kernels.dispatch.torch_formulation` (override: ``MEDCARE_MOLORA_FORMULATION=dense|grouped``):

* ``dense``: one thin GEMM ``x @ [A_all; A_s; W_r].T``, routing, the chosen experts' rank columns scaled
  by their gate weights (the others exact zeros), and one expand ``[H | Z_s] @ [B_all | B_s].T`` added
  into the base output. Every expert's ``r`` columns take part in the expand and in the backward
  (``E*r + r_s`` wide GEMMs): few, large operations.
* ``grouped``: token slots sorted by expert; one gather of the LoRA input rows, per expert segment a
  shrink and an expand into one sorted buffer, and one ``index_add_`` into ``y``; the backward walks the
  same segments with one gather of ``dy`` and one scatter of ``d lora_x``. Only the chosen experts'
  columns (``k*r``) are computed, at the price of row gathers and one host read of the per-expert token
  counts (a device synchronisation on CUDA).

Both save the same state for the backward: ``z`` [T, k*r + r_s], the chosen experts' shrink outputs in
slot order (token t, choice j), then the shared experts' shrink, plus the router logits and routing.

Why few operations: on a 2-core CPU that other processes also use, every parallel operation waits for
its slowest thread, so a layer of hundreds of small operations runs several times slower under load
than its FLOPs say (benchmarks/RESULTS.md, "Host overhead" and "End to end").

Non-finite values (the contract of :func:`medcare_kernels.molora_linear`): experts no token chose are
never read (their ``B`` is masked out of the dense expand, their ``A`` out of the dense ``dx``) and get
exact zero gradients; the routed columns of unchosen experts are written by scattering, never by
multiplying by zero.
"""

from __future__ import annotations

import itertools
import threading

import torch

from medcare_kernels.backends.pytorch.route import backward as route_backward
from medcare_kernels.backends.pytorch.route import forward as route_forward
from medcare_kernels.dispatch import accumulate_dtype, torch_formulation

_local = threading.local()


def _as(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in ``dtype`` (no dispatcher call when it already is)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _workspace(slot: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable [rows, cols] scratch buffer: on the CPU kept between calls (per thread), grown on demand.

    On the CPU a fresh multi-megabyte allocation costs a page fault per 4 KiB on first touch, which
    for the sorted buffers here costs as much as their GEMMs; CUDA's caching allocator needs no help.
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


def _used(indices: torch.Tensor, experts: int) -> torch.Tensor:
    """[E, 1, 1] bool: which experts at least one token chose (no host synchronisation)."""
    used = torch.zeros(experts, 1, 1, dtype=torch.bool, device=indices.device)
    return used.index_fill_(0, indices.view(-1), True)


def _masked(used: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` [E, ...] with the experts no token chose set to exact zeros (``torch.where``: an inf or
    NaN there does not survive, as it would a multiplication by zero)."""
    return torch.where(used, value, 0.0)


def _packed_BT(lora_B, shared_B, used, acc) -> torch.Tensor:
    """``[B_0 | ... | B_{E-1} | B_s].T`` as one contiguous [E*r + r_s, d_out] matrix, idle experts zeroed.

    Row-major ``[K, d_out]`` is the operand layout CPU BLAS handles best for both the expand
    (``H @ BT``) and its backward (``dy @ BT.T``); a transposed view is several times slower at small K.
    """
    E, d_out, r = lora_B.shape
    routed = _masked(used, _as(lora_B, acc).mT)
    if shared_B is None:
        return routed.reshape(E * r, d_out)
    return torch.cat([routed.reshape(E * r, d_out), _as(shared_B, acc).T])


def _scatter_slots(values: torch.Tensor, indices: torch.Tensor, experts: int, extra: int = 0) -> torch.Tensor:
    """[T, k, r] slot values -> [T, E*r + extra] with each slot at its expert's columns, exact zeros in
    the other experts' columns (``extra`` trailing columns left for the caller to fill)."""
    T, k, r = values.shape
    out = torch.zeros(T, experts * r + extra, dtype=values.dtype, device=values.device)
    out[:, : experts * r].view(T, experts, r).scatter_(1, indices.unsqueeze(-1).expand(T, k, r), values)
    return out


class _Sorted:
    """Token slots ``(t, j)`` sorted by expert (stable): ``order`` [T*k] slot ids (``t*k + j``), ``tokens``
    [T*k] their tokens, and per expert ``(e, start, stop)`` for each non-empty segment. The segment
    sizes are read on the host (a device synchronisation on CUDA)."""

    def __init__(self, indices: torch.Tensor, experts: int):
        flat = indices.view(-1)
        self.order = flat.argsort(stable=True)
        self.tokens = self.order // indices.shape[1]
        counts = torch.bincount(flat, minlength=experts).tolist()
        ends = list(itertools.accumulate(counts))
        self.segments = [(e, end - n, end) for e, (n, end) in enumerate(zip(counts, ends)) if n]

    def gather(self, slot_values: torch.Tensor) -> torch.Tensor:
        """[T, k, ...] per-slot values -> [T*k, ...] in sorted order."""
        return slot_values.reshape(-1, *slot_values.shape[2:]).index_select(0, self.order)


def forward(x, weight, bias, router_weight, router_bias, lora_A, lora_B, shared_A, shared_B, lora_x,
            top_k: int, scaling: float):
    """x [T, d_in] -> (y [T, d_out] in x.dtype, logits [T, E], weights [T, k], indices [T, k], z).

    logits, weights and z [T, k*r + r_s] are float32 (float64 for float64 inputs); indices int64.
    """
    T, d_in = x.shape
    E, r, _ = lora_A.shape
    r_s = 0 if shared_A is None else shared_A.shape[0]
    acc = accumulate_dtype(x.dtype, lora_A.dtype, router_weight.dtype)
    dense = torch_formulation(T, E, r, top_k, x.device) == "dense"
    xa = _as(x, acc)
    lx = xa if lora_x is None else _as(lora_x, acc)

    # The thin GEMM over the LoRA input: the shared shrink, every expert's shrink when dense, and the
    # router when it reads the same input (no dropout).
    rows = ([lora_A.reshape(E * r, d_in)] if dense else []) + ([shared_A] if r_s else [])
    n = (E * r if dense else 0) + r_s
    if lora_x is None:
        thin = xa @ _as(torch.cat([*rows, router_weight]), acc).T
        logits = thin[:, n:]
    else:
        thin = lx @ _as(torch.cat(rows), acc).T if rows else None
        logits = xa @ _as(router_weight, acc).T
    logits = logits + _as(router_bias, acc) if router_bias is not None else logits.contiguous()
    weights, indices = route_forward(logits, top_k)

    y = _as(torch.nn.functional.linear(x, weight, bias), acc)
    z_shared = thin[:, n - r_s: n] if r_s else None
    if dense:
        slot_index = indices.unsqueeze(-1).expand(T, top_k, r)
        z_slots = thin[:, : E * r].view(T, E, r).gather(1, slot_index)
        h = _scatter_slots(z_slots * weights.unsqueeze(-1), indices, E, r_s)
        if r_s:
            h[:, E * r:] = z_shared
        y.addmm_(h, _packed_BT(lora_B, shared_B, _used(indices, E), acc), alpha=scaling)
        z_routed = z_slots.view(T, top_k * r)
    else:
        if r_s:
            y.addmm_(z_shared, _as(shared_B, acc).T, alpha=scaling)
        srt = _Sorted(indices, E)
        lx_sorted = torch.index_select(lx, 0, srt.tokens, out=_workspace("x", T * top_k, d_in, acc, x.device))
        z_sorted = torch.empty(T * top_k, r, dtype=acc, device=x.device)
        for e, a, b in srt.segments:
            torch.mm(lx_sorted[a:b], _as(lora_A[e], acc).T, out=z_sorted[a:b])
        h_sorted = z_sorted * (weights.view(-1).index_select(0, srt.order) * scaling).unsqueeze(-1)
        y_sorted = _workspace("y", T * top_k, weight.shape[0], acc, x.device)
        for e, a, b in srt.segments:
            torch.mm(h_sorted[a:b], _as(lora_B[e], acc).T, out=y_sorted[a:b])
        y.index_add_(0, srt.tokens, y_sorted)
        z_routed = torch.empty(T * top_k, r, dtype=acc, device=x.device).index_copy_(0, srt.order, z_sorted)
        z_routed = z_routed.view(T, top_k * r)
    z = torch.cat([z_routed, z_shared], 1) if r_s else z_routed
    return _as(y, x.dtype), logits, weights, indices, z


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
    dy = _as(grad_y, acc)
    xa = _as(x, acc)
    lx = xa if lora_x is None else _as(lora_x, acc)
    z_slots = z[:, : top_k * r].view(T, top_k, r)
    z_shared = z[:, top_k * r:]
    need_lora_in = need_lx or (lora_x is None and need_x)
    dense = torch_formulation(T, E, r, top_k, dev) == "dense"
    gates = weights * scaling
    used = _used(indices, E)

    # Rank space: d_weights (d loss / d gate weights) and d_thin, the gradient of the thin GEMM's output
    # [T, n] for the rows a_rows [n, d_in]; the grouped form handles its routed experts per segment.
    d_A = d_B = d_Bs = d_lx = None
    blocks: list[torch.Tensor] = []
    a_rows: list[torch.Tensor] = []
    if dense:
        bt = _packed_BT(lora_B, shared_B, used, acc)
        dh = dy @ bt.T  # [T, E*r + r_s]: dy @ [B_all | B_s], one GEMM for routed and shared experts
        slot_index = indices.unsqueeze(-1).expand(T, top_k, r)
        dh_slots = dh[:, : E * r].view(T, E, r).gather(1, slot_index)
        d_weights = (dh_slots * z_slots).sum(-1) * scaling
        blocks.append(_scatter_slots(dh_slots * gates.unsqueeze(-1), indices, E))
        a_rows.append(_masked(used, _as(lora_A, acc)).view(E * r, d_in))
        if r_s:
            blocks.append(dh[:, E * r:] * scaling)
            a_rows.append(_as(shared_A, acc))
        if need_bb or (need_bs and r_s):
            h = _scatter_slots(z_slots * gates.unsqueeze(-1), indices, E, r_s)
            if r_s:
                h[:, E * r:] = z_shared * scaling
            d_cat = h.T @ dy  # [E*r + r_s, d_out]
            if need_bb:
                d_B = _masked(used, d_cat[: E * r].view(E, r, d_out).mT)
            if need_bs and r_s:
                d_Bs = d_cat[E * r:].T
    else:
        srt = _Sorted(indices, E)
        gate_sorted = gates.view(-1).index_select(0, srt.order).unsqueeze(-1)
        z_sorted = srt.gather(z_slots)
        h_sorted = z_sorted * gate_sorted
        dy_sorted = torch.index_select(dy, 0, srt.tokens, out=_workspace("y", T * top_k, d_out, acc, dev))
        dh_sorted = torch.empty_like(z_sorted)
        d_A = torch.zeros(E, r, d_in, dtype=acc, device=dev) if need_a else None
        d_B = torch.zeros(E, d_out, r, dtype=acc, device=dev) if need_bb else None
        for e, a, b in srt.segments:
            torch.mm(dy_sorted[a:b], _as(lora_B[e], acc), out=dh_sorted[a:b])
            if need_bb:
                torch.mm(dy_sorted[a:b].T, h_sorted[a:b], out=d_B[e])
        d_weights = torch.empty(T * top_k, dtype=acc, device=dev).index_copy_(
            0, srt.order, (dh_sorted * z_sorted).sum(-1) * scaling).view(T, top_k)
        if need_a or need_lora_in:
            dz_sorted = dh_sorted * gate_sorted
            lx_sorted = torch.index_select(lx, 0, srt.tokens, out=_workspace("x", T * top_k, d_in, acc, dev)) \
                if need_a else None
            d_lx_sorted = _workspace("dx", T * top_k, d_in, acc, dev) if need_lora_in else None
            for e, a, b in srt.segments:
                if need_a:
                    torch.mm(dz_sorted[a:b].T, lx_sorted[a:b], out=d_A[e])
                if need_lora_in:
                    torch.mm(dz_sorted[a:b], _as(lora_A[e], acc), out=d_lx_sorted[a:b])
            if need_lora_in:
                d_lx = torch.zeros(T, d_in, dtype=acc, device=dev).index_add_(0, srt.tokens, d_lx_sorted)
        if r_s:
            blocks.append((dy @ _as(shared_B, acc)) * scaling)
            a_rows.append(_as(shared_A, acc))
            if need_bs:
                d_Bs = (dy.T @ z_shared) * scaling

    # The router, through the renormalised top-k weights, plus any gradient on the returned logits.
    d_logits = route_backward(d_weights, logits, weights, indices)
    if grad_logits is not None:
        d_logits = d_logits + _as(grad_logits, acc)
    if lora_x is None:
        blocks.append(d_logits)
        a_rows.append(_as(router_weight, acc))

    # Thin GEMMs back to d_in: every rank-space block that reads the same input, in one GEMM each way.
    d_rows: list[torch.Tensor] = []
    if blocks:
        d_thin = torch.cat(blocks, 1) if len(blocks) > 1 else blocks[0]
        if need_lora_in:
            back = d_thin @ (torch.cat(a_rows) if len(a_rows) > 1 else a_rows[0])
            d_lx = back if d_lx is None else d_lx.add_(back)
        if need_a or need_as or (lora_x is None and need_wr):
            d_rows = list(torch.split(d_thin.T @ lx, [t.shape[1] for t in blocks]))
    if need_a and dense:
        d_A = _masked(used, d_rows[0].view(E, r, d_in))
    d_as = d_rows[1 if dense else 0] if (need_as and r_s) else None
    d_wr = None
    if need_wr:
        d_wr = d_rows[-1] if lora_x is None else d_logits.T @ xa

    d_x = None
    if need_x:
        d_x = _as(grad_y @ weight, acc)
        if lora_x is None:
            d_x = d_x.add_(d_lx)
        else:
            d_x.addmm_(d_logits, _as(router_weight, acc))
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
    return [None if g is None else _as(g, dt) for g, dt in zip(grads, dtypes)]
