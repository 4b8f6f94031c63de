"""Float64 implementations of the MedCare formulas, written for the tests independently of the library.

Each works per token choice with explicit gathers (no rank-space tricks), in float64, and is
differentiated by autograd; the tests compare every backend's outputs and gradients against them.
"""

from __future__ import annotations

import torch

f64 = torch.float64


def route_indices(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Top-k expert indices per row of ``logits`` [T, E], in descending probability, ties to the lower index."""
    p = torch.softmax(logits.detach().to(f64), dim=-1).tolist()
    rows = [sorted(range(len(row)), key=lambda e: (-row[e], e))[:top_k] for row in p]
    return torch.tensor(rows, dtype=torch.int64).reshape(len(p), top_k)


def route(logits: torch.Tensor, top_k: int, indices: torch.Tensor | None = None):
    """(weights [T, k] float64, indices [T, k]); differentiable w.r.t. logits through the weights."""
    if indices is None:
        indices = route_indices(logits, top_k)
    p = torch.softmax(logits.to(f64), dim=-1)
    chosen = p.gather(1, indices)
    return chosen / chosen.sum(-1, keepdim=True), indices


def topk_margin(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per row, the gap between the k-th and (k+1)-th largest probability (inf when k == E)."""
    p = torch.softmax(logits.detach().to(f64), dim=-1).sort(-1, descending=True).values
    if top_k == p.shape[1]:
        return torch.full((p.shape[0],), float("inf"), dtype=f64)
    return p[:, top_k - 1] - p[:, top_k]


def order_margin(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per row, the smallest gap between consecutive probabilities among the ``top_k + 1`` largest: how
    close the top-k *set and its order* are to a tie (inf when there is nothing to compare). Two correct
    implementations may differ in ``indices`` (order included) only where this is within roundoff."""
    p = torch.softmax(logits.detach().to(f64), dim=-1).sort(-1, descending=True).values[:, : top_k + 1]
    if p.shape[1] < 2:
        return torch.full((p.shape[0],), float("inf"), dtype=f64)
    return (p[:, :-1] - p[:, 1:]).min(-1).values


def molora(x, weight, bias, router_weight, router_bias, lora_A, lora_B, shared_A, shared_B, top_k, scaling,
           lora_x=None, indices=None):
    """MoLoRA linear in float64 -> (y [T, d_out], logits [T, E], indices)."""
    x64 = x.to(f64)
    lx = x64 if lora_x is None else lora_x.to(f64)
    logits = x64 @ router_weight.to(f64).T
    if router_bias is not None:
        logits = logits + router_bias.to(f64)
    w, idx = route(logits, top_k, indices)
    y = x64 @ weight.to(f64).T
    if bias is not None:
        y = y + bias.to(f64)
    A, B = lora_A.to(f64), lora_B.to(f64)
    for j in range(top_k):
        h = torch.einsum("td,trd->tr", lx, A[idx[:, j]])
        y = y + scaling * w[:, j, None] * torch.einsum("tr,tor->to", h, B[idx[:, j]])
    if shared_A is not None:
        y = y + scaling * (lx @ shared_A.to(f64).T) @ shared_B.to(f64).T
    return y, logits, idx


def lora(x, weight, bias, lora_A, lora_B, scaling, lora_x=None):
    x64 = x.to(f64)
    lx = x64 if lora_x is None else lora_x.to(f64)
    y = x64 @ weight.to(f64).T + scaling * (lx @ lora_A.to(f64).T) @ lora_B.to(f64).T
    return y if bias is None else y + bias.to(f64)


def orthogonal_penalty(base_A, orth_A):
    total = torch.zeros((), dtype=f64)
    for b, o in zip(base_A, orth_A):
        total = total + (b.to(f64) @ o.to(f64).T).abs().sum()
    return total


def leaf64(t: torch.Tensor | None) -> torch.Tensor | None:
    """A float64 leaf copy of ``t`` that requires grad when ``t`` does (None stays None)."""
    if t is None:
        return None
    return t.detach().to(f64).requires_grad_(t.requires_grad)
