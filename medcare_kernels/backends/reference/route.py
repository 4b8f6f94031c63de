"""Reference routing as the authors compute it: softmax over the experts, top-k, renormalise, differentiated
by autograd."""

from __future__ import annotations

import torch

from medcare_kernels.dispatch import accumulate_dtype


def apply(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k] float32, indices [T, k] int64), differentiable w.r.t. logits.
    Equal probabilities go to the lower expert index (a stable sort)."""
    p = torch.softmax(logits.to(accumulate_dtype(logits.dtype)), dim=-1)
    values, indices = torch.sort(p, dim=-1, descending=True, stable=True)
    weights = values[:, :top_k]
    return weights / weights.sum(dim=-1, keepdim=True), indices[:, :top_k].contiguous()
