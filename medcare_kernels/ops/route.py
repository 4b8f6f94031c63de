"""``route``: float32 softmax over the experts, top-k (ties to the lower index), renormalised weights."""

from __future__ import annotations

import torch
from torch import Tensor

from medcare_kernels import _checks
from medcare_kernels.backends import get_impl, resolve_backend
from medcare_kernels.dispatch import accumulate_dtype
from medcare_kernels.ops import _run

_OP = "route"


@torch.library.custom_op("medcare_kernels::route", mutates_args=())
def _route_op(logits: Tensor, top_k: int, backend: str) -> tuple[Tensor, Tensor]:
    weights, indices = get_impl(_OP, backend).forward(logits, top_k)
    return weights, indices


@_route_op.register_fake
def _(logits, top_k, backend):
    acc = accumulate_dtype(logits.dtype)
    T = logits.shape[0]
    return logits.new_empty(T, top_k, dtype=acc), logits.new_empty(T, top_k, dtype=torch.int64)


@torch.library.custom_op("medcare_kernels::route_backward", mutates_args=())
def _route_backward_op(grad_weights: Tensor, logits: Tensor, weights: Tensor, indices: Tensor,
                       backend: str) -> Tensor:
    return get_impl(_OP, backend).backward(grad_weights, logits, weights, indices).to(logits.dtype)


@_route_backward_op.register_fake
def _(grad_weights, logits, weights, indices, backend):
    return torch.empty_like(logits)


def _setup(ctx, inputs, output):
    logits, _top_k, backend = inputs
    weights, indices = output
    ctx.save_for_backward(logits, weights, indices)
    ctx.backend = backend


def _backward(ctx, grad_weights, _grad_indices):
    logits, weights, indices = ctx.saved_tensors
    if grad_weights is None:
        grad_weights = torch.zeros_like(weights)
    return _route_backward_op(grad_weights.contiguous(), logits, weights, indices, ctx.backend), None, None


_route_op.register_autograd(_backward, setup_context=_setup)


class _RouteFunction(torch.autograd.Function):
    """The eager path (:mod:`medcare_kernels.ops._run`): the custom op's forward and backward, called directly."""

    @staticmethod
    def forward(ctx, impl, logits, top_k):
        weights, indices = impl.forward(logits, top_k)
        ctx.save_for_backward(logits, weights, indices)
        ctx.impl = impl
        ctx.mark_non_differentiable(indices)
        return weights, indices

    @staticmethod
    def backward(ctx, grad_weights, _grad_indices):
        logits, weights, indices = ctx.saved_tensors
        return None, ctx.impl.backward(grad_weights.contiguous(), logits, weights, indices).to(logits.dtype), None


def route(logits: Tensor, top_k: int, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Top-k routing over experts.

    ``p = softmax(logits)`` in float32, the ``top_k`` largest (equal values: the lower expert index
    first, in descending order of weight), renormalised to sum to one over the chosen experts.

    Args:
        logits: ``[..., E]`` router logits, any floating dtype.
        top_k: experts per token, ``1 <= top_k <= E``.
        backend: ``"auto"``, or a name from :func:`medcare_kernels.available_backends`.

    Returns:
        ``(weights [..., k] float32, indices [..., k] int64)``; float64 weights for float64 logits.
        Differentiable w.r.t. ``logits`` through the weights. A row with a NaN or infinite logit gets k
        distinct valid experts and NaN weights; the other rows are unaffected.
    """
    _checks.tensor("logits", logits, min_ndim=1)
    E = logits.shape[-1]
    if E < 1:
        raise ValueError(f"logits must have at least one expert in its last dimension, got shape {list(logits.shape)}")
    top_k = _checks.integer("top_k", top_k, low=1, high=E, high_name="E")
    grad = _run.needs_grad(logits)
    be = resolve_backend(_OP, backend, logits.device, accumulate_dtype(logits.dtype), logits.numel() // E, grad)
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, E).contiguous()
    weights, indices = _run.call(_OP, be, (flat, top_k), eager=_RouteFunction.apply, custom_op=_route_op, outputs=2,
                                 grad=grad)
    return weights.reshape(*lead, top_k), indices.reshape(*lead, top_k)
