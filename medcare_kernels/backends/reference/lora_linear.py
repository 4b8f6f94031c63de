"""Reference LoRA linear: ``F.linear(x, W, b) + s * B(A(dropout(x)))`` as in the published code."""

from __future__ import annotations

import torch

from medcare_kernels.dispatch import accumulate_dtype


def apply(x, weight, bias, lora_A, lora_B, lora_x, scaling: float):
    """x [T, d_in] -> y [T, d_out] in x.dtype; differentiable."""
    acc = accumulate_dtype(x.dtype, lora_A.dtype)
    lx = (x if lora_x is None else lora_x).to(acc)
    delta = (lx @ lora_A.to(acc).T) @ lora_B.to(acc).T * scaling
    return (torch.nn.functional.linear(x, weight, bias).to(acc) + delta).to(x.dtype)
