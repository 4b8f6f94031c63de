"""``lora_linear``: a frozen linear plus one (possibly concatenated) LoRA, float32 LoRA arithmetic."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from medcare_kernels import _checks
from medcare_kernels.backends import get_impl, resolve_backend
from medcare_kernels.dispatch import accumulate_dtype
from medcare_kernels.ops import _grads, _run

_OP = "lora_linear"
_GRAD_INPUTS = ("x", "weight", "bias", "lora_A", "lora_B", "lora_x")


@torch.library.custom_op("medcare_kernels::lora_linear", mutates_args=())
def _lora_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                    lora_x: Optional[Tensor], scaling: float, backend: str) -> tuple[Tensor, Tensor]:
    y, z = get_impl(_OP, backend).forward(x, weight, bias, lora_A, lora_B, lora_x, scaling)
    y, z = _grads.pack([y, z], x, [x, weight, bias, lora_A, lora_B, lora_x])
    return y, z


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, lora_x, scaling, backend):
    acc = accumulate_dtype(x.dtype, lora_A.dtype)
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0], dtype=acc)


@torch.library.custom_op("medcare_kernels::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(grad_y: Tensor, x: Tensor, lora_x: Optional[Tensor], weight: Tensor,
                             lora_A: Tensor, lora_B: Tensor, z: Tensor, scaling: float, needs: list[bool],
                             backend: str) -> list[Tensor]:
    grads = get_impl(_OP, backend).backward(grad_y, x, lora_x, weight, lora_A, lora_B, z, scaling, needs)
    return _grads.pack(grads, x, [grad_y, x, lora_x, weight, lora_A, lora_B, z])


@_lora_linear_backward_op.register_fake
def _(grad_y, x, lora_x, weight, lora_A, lora_B, z, scaling, needs, backend):
    return _grads.fake([(x.shape, x.dtype), (weight.shape, weight.dtype), ((weight.shape[0],), weight.dtype),
                        (lora_A.shape, lora_A.dtype), (lora_B.shape, lora_B.dtype), (x.shape, x.dtype)], needs, x)


def _setup(ctx, inputs, output):
    x, weight, _bias, lora_A, lora_B, lora_x, scaling, backend = inputs
    ctx.save_for_backward(x, lora_x, weight, lora_A, lora_B, output[1])
    ctx.scaling, ctx.backend = scaling, backend


def _backward(ctx, grad_y, _grad_z):
    needs = list(ctx.needs_input_grad[: len(_GRAD_INPUTS)])
    saved = ctx.saved_tensors
    grad_y = _run.dense_grad(grad_y, saved[0], saved[2])  # saved: x first, the base weight third
    grads = _lora_linear_backward_op(grad_y, *saved, ctx.scaling, needs, ctx.backend)
    return (*_grads.unpack(grads, needs), None, None)


_lora_linear_op.register_autograd(_backward, setup_context=_setup)


class _LoRAFunction(torch.autograd.Function):
    """The eager path (:mod:`medcare_kernels.ops._run`): the custom op's forward and backward, called directly."""

    @staticmethod
    def forward(ctx, impl, x, weight, bias, lora_A, lora_B, lora_x, scaling):
        y, z = impl.forward(x, weight, bias, lora_A, lora_B, lora_x, scaling)
        ctx.save_for_backward(x, lora_x, weight, lora_A, lora_B, z)
        ctx.impl, ctx.scaling = impl, scaling
        return y

    @staticmethod
    def backward(ctx, grad_y):
        saved = ctx.saved_tensors
        grads = ctx.impl.backward(_run.dense_grad(grad_y, saved[0], saved[2]), *saved, ctx.scaling,
                                  ctx.needs_input_grad[1: 1 + len(_GRAD_INPUTS)])
        return (None, *grads, None)


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, *,
                scaling: float, lora_x: Tensor | None = None, backend: str = "auto") -> Tensor:
    """LoRA linear: ``y = x @ W.T + b + s * (lx @ A.T) @ B.T`` with ``lx = lora_x if given else x``.

    Args:
        x: ``[..., d_in]``. weight: ``[d_out, d_in]`` (x's dtype). bias: ``[d_out]`` or None.
        lora_A: ``[r, d_in]``; lora_B: ``[d_out, r]``, one dtype. Several LoRAs of one layer are one
            LoRA with their A's and B's concatenated along r (same scaling).
        scaling: the LoRA scale ``s``. lora_x: the LoRA input when it differs from x (x's shape/dtype).
        backend: ``"auto"``, or a name from :func:`medcare_kernels.available_backends`.

    Returns:
        ``y [..., d_out]`` in x's dtype; differentiable w.r.t. every floating input. A NaN or inf in one
        token's input makes that token's row of ``y`` non-finite and no other.
    """
    d_out, d_in = _checks.base_linear(x, weight, bias)
    lora_A = _checks.tensor("lora_A", lora_A, ndim=2)
    r = lora_A.shape[0]
    _checks.shape("lora_A", lora_A, (r, d_in), "[r, d_in]")
    _checks.rank("lora_A", r, "r", "lora_A is [r, d_in]")
    _checks.tensor("lora_B", lora_B, ndim=2)
    _checks.shape("lora_B", lora_B, (d_out, r), "[d_out, r] (r from lora_A)")
    _checks.same_dtype("lora_B", lora_B, "lora_A", lora_A)
    scaling = _checks.real("scaling", scaling)
    _checks.lora_x(lora_x, x)
    device = _checks.same_device([("x", x), ("weight", weight), ("bias", bias), ("lora_A", lora_A),
                                  ("lora_B", lora_B), ("lora_x", lora_x)])
    grad = _run.needs_grad(x, weight, bias, lora_A, lora_B, lora_x)
    be = resolve_backend(_OP, backend, device, accumulate_dtype(x.dtype, lora_A.dtype), x.numel() // d_in, grad)
    x2, lx2 = _checks.tokens_2d(x, lora_x)
    (y,) = _run.call(_OP, be, (x2, weight, bias, lora_A, lora_B, lx2, scaling), eager=_LoRAFunction.apply,
                     custom_op=_lora_linear_op, outputs=1, grad=grad)
    return y.reshape(*x.shape[:-1], d_out)
