"""``route`` on the compiled kernels: ``route_fwd_cuda`` / ``route_bwd_cuda`` (float64: torch backend)."""

from __future__ import annotations

import torch

from medcare_kernels.backends.pytorch import route as _torch

_ops = torch.ops.medcare_kernels


def forward(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k] float32, indices [T, k] int64)."""
    if logits.dtype == torch.float64:
        return _torch.forward(logits, top_k)
    weights, indices = _ops.route_fwd_cuda(logits, top_k)
    return weights, indices


def backward(grad_weights, logits, weights, indices) -> torch.Tensor:
    """d loss / d logits [T, E] in float32 (float64 for float64 logits)."""
    if logits.dtype == torch.float64:
        return _torch.backward(grad_weights, logits, weights, indices)
    return _ops.route_bwd_cuda(grad_weights.to(torch.float32).contiguous(), logits, weights.to(torch.float32),
                               indices)
