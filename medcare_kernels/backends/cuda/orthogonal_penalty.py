"""``orthogonal_penalty`` on the compiled kernels: every layer in one launch per pass, deterministic.

The kernels take one element type for all tensors: mixed float16/bfloat16/float32 lists are upcast to
float32 (exact), and float64 lists use the torch backend. Gradients come back in each input's dtype.
"""

from __future__ import annotations

import torch

from medcare_kernels.backends.cuda import KERNEL_DTYPES
from medcare_kernels.backends.pytorch import orthogonal_penalty as _torch

_ops = torch.ops.medcare_kernels


def _kernel_dtype(tensors) -> torch.dtype | None:
    dtypes = {t.dtype for t in tensors}
    if not dtypes <= set(KERNEL_DTYPES):
        return None
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def forward(base_A, orth_A) -> torch.Tensor:
    dt = _kernel_dtype([*base_A, *orth_A])
    if dt is None:
        return _torch.forward(base_A, orth_A)
    return _ops.orthogonal_penalty_fwd_cuda([t.to(dt) for t in base_A], [t.to(dt) for t in orth_A])


def backward(grad, base_A, orth_A, needs):
    dt = _kernel_dtype([*base_A, *orth_A])
    if dt is None:
        return _torch.backward(grad, base_A, orth_A, needs)
    need_base, need_orth = bool(needs[0]), bool(needs[1])
    d_base, d_orth = _ops.orthogonal_penalty_bwd_cuda(
        grad.to(torch.float32).reshape(()), [t.to(dt) for t in base_A], [t.to(dt) for t in orth_A], need_base,
        need_orth)
    d_base = [g.to(t.dtype) for g, t in zip(d_base, base_A)] if need_base else [None] * len(base_A)
    d_orth = [g.to(t.dtype) for g, t in zip(d_orth, orth_A)] if need_orth else [None] * len(orth_A)
    return d_base, d_orth
