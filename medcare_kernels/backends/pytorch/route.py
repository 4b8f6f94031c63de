"""Routing in PyTorch: float32 softmax over experts, top-k (ties -> lower index), renormalise."""

from __future__ import annotations

import torch

from medcare_kernels.dispatch import accumulate_dtype


def topk_lower_index(p: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top_k`` largest entries of each row of ``p`` [T, E]; equal values go to the lower index."""
    values, indices = torch.sort(p, dim=-1, descending=True, stable=True)
    return values[:, :top_k].contiguous(), indices[:, :top_k].contiguous()


def forward(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k] float32 (float64 for float64 logits), indices [T, k] int64)."""
    p = torch.softmax(logits.to(accumulate_dtype(logits.dtype)), dim=-1)
    weights, indices = topk_lower_index(p, top_k)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


def backward(
    grad_weights: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """d loss / d logits [T, E] (accumulation dtype) from d loss / d weights [T, k].

    With ``p = softmax(logits)``, ``q = p[indices]``, ``S = sum(q)`` and ``w = q / S``:
    ``dq = (g - sum(g * w)) / S``, scattered to ``dp``, then ``dlogits = p * (dp - sum(p * dp))``.
    """
    p = torch.softmax(logits.to(weights.dtype), dim=-1)
    g = grad_weights.to(weights.dtype)
    chosen_sum = p.gather(1, indices).sum(dim=-1, keepdim=True)
    dq = (g - (g * weights).sum(dim=-1, keepdim=True)) / chosen_sum
    dp = torch.zeros_like(p).scatter_(1, indices, dq)
    return p * (dp - (p * dp).sum(dim=-1, keepdim=True))
