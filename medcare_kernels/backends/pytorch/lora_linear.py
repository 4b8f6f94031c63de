"""Plain LoRA linear in PyTorch: ``y = x @ W.T + b + s * (lora_x @ A.T) @ B.T`` with float32 LoRA math, in as
few operations as the formula allows (a small call's host time is its operation count)."""

from __future__ import annotations

import torch

from medcare_kernels.dispatch import accumulate_dtype


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def forward(x, weight, bias, lora_A, lora_B, lora_x, scaling: float):
    """x [T, d_in] -> (y [T, d_out] in x.dtype, z [T, r] = lora_x @ A.T in float32/float64)."""
    acc = accumulate_dtype(x.dtype, lora_A.dtype)
    z = _as(x if lora_x is None else lora_x, acc) @ _as(lora_A, acc).T
    y = _as(torch.nn.functional.linear(x, weight, bias), acc)
    y.addmm_(z, _as(lora_B, acc).T, alpha=scaling)
    return _as(y, x.dtype), z


def backward(grad_y, x, lora_x, weight, lora_A, lora_B, z, scaling: float, needs):
    """Gradients for (x, weight, bias, lora_A, lora_B, lora_x), None where ``needs`` is False."""
    need_x, need_w, need_b, need_a, need_bb, need_lx = needs
    acc = z.dtype
    dy = _as(grad_y, acc)
    dz = (dy @ _as(lora_B, acc)).mul_(scaling)
    d_lx = dz @ _as(lora_A, acc) if (need_lx or (need_x and lora_x is None)) else None
    d_x = None
    if need_x:
        d_x = _as(grad_y @ weight, acc)
        if lora_x is None:
            d_x = d_x.add_(d_lx)
    grads = [
        d_x,
        (grad_y.T @ x) if need_w else None,
        dy.sum(0) if need_b else None,
        (dz.T @ _as(x if lora_x is None else lora_x, acc)) if need_a else None,
        (dy.T @ z).mul_(scaling) if need_bb else None,
        d_lx if need_lx else None,
    ]
    dtypes = [x.dtype, weight.dtype, weight.dtype, lora_A.dtype, lora_B.dtype, x.dtype]
    return [None if g is None else _as(g, dt) for g, dt in zip(grads, dtypes)]
