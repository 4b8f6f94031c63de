"""Orthogonal penalty in PyTorch: ``sum_l sum(abs(A_base_l @ A_orth_l.T))``, layers batched by shape.

Pairs of equal shapes (e.g. every ``gate_proj`` of a model) are stacked and reduced with one ``bmm``,
so a model costs one GEMM per distinct ``(r1, r2, d_l)``, not one per layer.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from medcare_kernels.dispatch import accumulate_dtype


def _groups(base_A, orth_A):
    """Layer indices grouped by (base shape, orth shape)."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (b, o) in enumerate(zip(base_A, orth_A)):
        groups[(tuple(b.shape), tuple(o.shape))].append(i)
    return groups.values()


def _acc(base_A, orth_A) -> torch.dtype:
    return accumulate_dtype(*[t.dtype for t in list(base_A) + list(orth_A)])


def forward(base_A, orth_A) -> torch.Tensor:
    """Lists of [r1, d_l] and [r2, d_l] -> 0-d float32 (float64 for float64 inputs) penalty."""
    acc = _acc(base_A, orth_A)
    total = torch.zeros((), dtype=acc, device=base_A[0].device)
    for ids in _groups(base_A, orth_A):
        b = torch.stack([base_A[i].to(acc) for i in ids])
        o = torch.stack([orth_A[i].to(acc) for i in ids])
        total += torch.bmm(b, o.transpose(1, 2)).abs().sum()
    return total


def backward(grad, base_A, orth_A, needs):
    """(grads for base_A, grads for orth_A): ``g * sign(M) @ A_orth`` and ``g * sign(M).T @ A_base``."""
    need_base, need_orth = needs
    acc = _acc(base_A, orth_A)
    d_base: list[torch.Tensor | None] = [None] * len(base_A)
    d_orth: list[torch.Tensor | None] = [None] * len(orth_A)
    for ids in _groups(base_A, orth_A):
        b = torch.stack([base_A[i].to(acc) for i in ids])
        o = torch.stack([orth_A[i].to(acc) for i in ids])
        s = torch.bmm(b, o.transpose(1, 2)).sign_().mul_(grad.to(acc))
        db = torch.bmm(s, o) if need_base else None
        do = torch.bmm(s.transpose(1, 2), b) if need_orth else None
        for n, i in enumerate(ids):
            if need_base:
                d_base[i] = db[n].to(base_A[i].dtype)
            if need_orth:
                d_orth[i] = do[n].to(orth_A[i].dtype)
    return d_base, d_orth
