"""Routing in PyTorch: float32 softmax over experts, top-k (ties -> lower index), renormalise.

Softmax, top-k and renormalisation over the chosen experts are one softmax over the chosen logits:
``p_j / sum_chosen p = exp(l_j) / sum_chosen exp(l)``. So the forward sorts the logits (stable, so equal
values keep the lower expert index first) and takes a softmax of the k largest, and the backward is that
softmax's: the unchosen logits get exactly zero gradient. Four operations each way.
"""

from __future__ import annotations

import torch

from medcare_kernels.dispatch import accumulate_dtype


def forward(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k] float32 (float64 for float64 logits), indices [T, k] int64).

    A row with a NaN or infinite logit gets k distinct valid experts (sorting puts NaN first) and NaN
    weights."""
    acc = accumulate_dtype(logits.dtype)
    values, indices = torch.sort(logits if logits.dtype == acc else logits.to(acc), dim=-1, descending=True,
                                 stable=True)
    return torch.softmax(values[:, :top_k], dim=-1), indices[:, :top_k].contiguous()


def backward(grad_weights: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor,
             indices: torch.Tensor) -> torch.Tensor:
    """d loss / d logits [T, E] (accumulation dtype) from d loss / d weights [T, k]: the softmax backward
    over the chosen logits, ``w * (g - <g, w>)``, scattered to the chosen columns (zeros elsewhere)."""
    g = grad_weights if grad_weights.dtype == weights.dtype else grad_weights.to(weights.dtype)
    d_chosen = weights * (g - (g * weights).sum(dim=-1, keepdim=True))
    out = torch.zeros(logits.shape, dtype=weights.dtype, device=weights.device)
    return out.scatter_(1, indices, d_chosen)
