"""Reference routing: softmax, top-k, renormalise, differentiated by autograd."""

from __future__ import annotations

import torch

from medcare_kernels.backends.pytorch.route import topk_lower_index
from medcare_kernels.dispatch import accumulate_dtype


def apply(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k] float32, indices [T, k] int64), differentiable w.r.t. logits."""
    p = torch.softmax(logits.to(accumulate_dtype(logits.dtype)), dim=-1)
    weights, indices = topk_lower_index(p, top_k)
    return weights / weights.sum(dim=-1, keepdim=True), indices
