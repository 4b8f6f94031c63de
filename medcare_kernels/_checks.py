"""Argument checks shared by the public ops: clear errors that name the argument and what was expected.

Wrong Python types and dtypes raise ``TypeError``; wrong shapes, ranks, devices and values raise
``ValueError``. The checks read only shapes, dtypes and devices, so ``torch.compile`` traces them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fmt(shape: Sequence[object]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def tensor(name: str, value: object, *, ndim: int | None = None, min_ndim: int | None = None) -> torch.Tensor:
    """``value`` must be a floating-point tensor, with ``ndim`` dimensions (or at least ``min_ndim``)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {value.dtype}"
        )
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got {value.dim()}-D with shape {_fmt(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {_fmt(value.shape)}")
    return value


def optional_tensor(name: str, value: object, *, ndim: int) -> torch.Tensor | None:
    return None if value is None else tensor(name, value, ndim=ndim)


def shape(name: str, value: torch.Tensor, expected: Sequence[object], meaning: str) -> None:
    """``value.shape`` must equal ``expected``; ``meaning`` spells the symbols, e.g. ``"[d_out, d_in]"``."""
    if tuple(value.shape) != tuple(expected):
        raise ValueError(
            f"{name} must have shape {meaning} = {_fmt(expected)}, got {_fmt(value.shape)}"
        )


def same_dtype(name: str, value: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if value.dtype != other.dtype:
        raise TypeError(f"{name} must have the dtype of {other_name} ({other.dtype}), got {value.dtype}")


def same_device(named: Sequence[tuple[str, torch.Tensor | None]]) -> torch.device:
    """All non-None tensors must be on one device; returns it."""
    first_name, device = None, None
    for name, t in named:
        if t is None:
            continue
        if device is None:
            first_name, device = name, t.device
        elif t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {device}: put every tensor on one device")
    assert device is not None
    return device


def integer(name: str, value: object, *, low: int, high: int | None = None, high_name: str = "") -> int:
    """``value`` must be an int in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"{low} <= {name} <= {high_name or high}" + (f" = {high}" if high_name else "")
        raise ValueError(f"{name} must satisfy {bound}, got {value}")
    return value


def real(name: str, value: object) -> float:
    """``value`` must be a finite real number (not a bool, not a tensor, not nan or inf)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite float, got {value}")
    return value


def rank(name: str, value: int, dim: str, meaning: str) -> int:
    """A LoRA rank read off a tensor's shape must be at least 1 (a zero-width LoRA is not a LoRA)."""
    if value < 1:
        raise ValueError(f"{name} must have {dim} >= 1 ({meaning}), got {dim} = {value}")
    return value


def lora_x(value: object, x: torch.Tensor) -> torch.Tensor | None:
    """``lora_x`` is None or a tensor of ``x``'s shape and dtype (the LoRA input, e.g. ``dropout(x)``)."""
    if value is None:
        return None
    t = tensor("lora_x", value)
    shape("lora_x", t, x.shape, "x.shape")
    same_dtype("lora_x", t, "x", x)
    return t


def base_linear(x: object, weight: object, bias: object) -> tuple[int, int]:
    """The frozen linear's inputs: x [..., d_in], weight [d_out, d_in] and bias [d_out] | None, one dtype.

    Returns ``(d_out, d_in)``.
    """
    x = tensor("x", x, min_ndim=1)
    weight = tensor("weight", weight, ndim=2)
    d_out, d_in = weight.shape
    if d_in < 1:
        raise ValueError(f"weight must have d_in >= 1 input features, got shape {list(weight.shape)}")
    if x.shape[-1] != d_in:
        raise ValueError(f"x must have d_in = weight.shape[1] = {d_in} features in its last dimension, "
                         f"got shape {list(x.shape)}")
    same_dtype("weight", weight, "x", x)
    if optional_tensor("bias", bias, ndim=1) is not None:
        shape("bias", bias, (d_out,), "[d_out]")
        same_dtype("bias", bias, "weight", weight)
    return d_out, d_in


def tokens_2d(x: torch.Tensor, lora_x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` and ``lora_x`` as contiguous [T, d_in] (the layout every backend takes)."""
    d_in = x.shape[-1]
    return (x.reshape(-1, d_in).contiguous(),
            None if lora_x is None else lora_x.reshape(-1, d_in).contiguous())
