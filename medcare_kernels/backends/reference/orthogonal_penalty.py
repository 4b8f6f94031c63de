"""Reference orthogonal penalty: one ``abs(A_base @ A_orth.T).sum()`` per layer, summed."""

from __future__ import annotations

import torch

from medcare_kernels.dispatch import accumulate_dtype


def apply(base_A, orth_A) -> torch.Tensor:
    """Lists of [r1, d_l] and [r2, d_l] -> 0-d float32 penalty; differentiable."""
    acc = accumulate_dtype(*[t.dtype for t in list(base_A) + list(orth_A)])
    total = torch.zeros((), dtype=acc, device=base_A[0].device)
    for b, o in zip(base_A, orth_A):
        total = total + (b.to(acc) @ o.to(acc).T).abs().sum()
    return total
