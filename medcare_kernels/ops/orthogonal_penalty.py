"""``orthogonal_penalty``: ``sum_l sum(abs(A_base_l @ A_orth_l.T))`` over every wrapped layer at once."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from medcare_kernels import _checks
from medcare_kernels.backends import get_impl, resolve_backend
from medcare_kernels.dispatch import accumulate_dtype
from medcare_kernels.ops import _grads, _run

_OP = "orthogonal_penalty"


@torch.library.custom_op("medcare_kernels::orthogonal_penalty", mutates_args=())
def _penalty_op(base_A: list[Tensor], orth_A: list[Tensor], backend: str) -> Tensor:
    return get_impl(_OP, backend).forward(base_A, orth_A)


@_penalty_op.register_fake
def _(base_A, orth_A, backend):
    return base_A[0].new_empty((), dtype=accumulate_dtype(*[t.dtype for t in list(base_A) + list(orth_A)]))


@torch.library.custom_op("medcare_kernels::orthogonal_penalty_backward", mutates_args=())
def _penalty_backward_op(grad: Tensor, base_A: list[Tensor], orth_A: list[Tensor], needs: list[bool],
                         backend: str) -> list[Tensor]:
    d_base, d_orth = get_impl(_OP, backend).backward(grad, base_A, orth_A, needs)
    return _grads.pack(list(d_base) + list(d_orth), grad, [grad, *base_A, *orth_A])


@_penalty_backward_op.register_fake
def _(grad, base_A, orth_A, needs, backend):
    tensors = list(base_A) + list(orth_A)
    per_tensor = [needs[0]] * len(base_A) + [needs[1]] * len(orth_A)
    return _grads.fake([(t.shape, t.dtype) for t in tensors], per_tensor, grad)


def _setup(ctx, inputs, output):
    base_A, orth_A, backend = inputs
    ctx.save_for_backward(*base_A, *orth_A)
    ctx.layers, ctx.backend = len(base_A), backend


def _backward(ctx, grad):
    saved = ctx.saved_tensors
    base_A, orth_A = list(saved[: ctx.layers]), list(saved[ctx.layers:])
    needs = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]
    grads = _penalty_backward_op(grad, base_A, orth_A, needs, ctx.backend)
    d_base = grads[: ctx.layers] if needs[0] else None
    d_orth = grads[ctx.layers:] if needs[1] else None
    return d_base, d_orth, None


_penalty_op.register_autograd(_backward, setup_context=_setup)


class _PenaltyFunction(torch.autograd.Function):
    """The eager path (:mod:`medcare_kernels.ops._run`): the backend's forward and backward, called directly.
    The layers arrive flattened (``layers`` base tensors, then as many orth tensors): autograd.Function
    differentiates tensor arguments only."""

    @staticmethod
    def forward(ctx, impl, layers, *tensors):
        base_A, orth_A = list(tensors[:layers]), list(tensors[layers:])
        ctx.save_for_backward(*tensors)
        ctx.impl, ctx.layers = impl, layers
        return impl.forward(base_A, orth_A)

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        n = ctx.layers
        needs = [any(ctx.needs_input_grad[2: 2 + n]), any(ctx.needs_input_grad[2 + n:])]
        d_base, d_orth = ctx.impl.backward(grad, list(saved[:n]), list(saved[n:]), needs)
        return (None, None, *(d_base if needs[0] else [None] * n), *(d_orth if needs[1] else [None] * n))


def _eager(impl, base_A, orth_A):
    return _PenaltyFunction.apply(impl, len(base_A), *base_A, *orth_A)


def orthogonal_penalty(base_A: Sequence[Tensor], orth_A: Sequence[Tensor], *, backend: str = "auto") -> Tensor:
    """The MedCare stage-2 penalty ``P = sum_l sum(abs(base_A[l] @ orth_A[l].T))``.

    Args:
        base_A: sequence of ``[r1_l, d_l]`` tensors (the frozen knowledge LoRA's A per layer).
        orth_A: sequence of ``[r2_l, d_l]`` tensors, same length; ``d_l`` may differ between layers.
        backend: ``"auto"``, or a name from :func:`medcare_kernels.available_backends`.

    Returns:
        A 0-d float32 tensor (float64 for float64 inputs), differentiable w.r.t. both sequences:
        ``dP/d orth_A[l] = sign(M_l).T @ base_A[l]`` and ``dP/d base_A[l] = sign(M_l) @ orth_A[l]``.
    """
    for name, seq in (("base_A", base_A), ("orth_A", orth_A)):
        if isinstance(seq, Tensor) or not isinstance(seq, Sequence):
            raise TypeError(f"{name} must be a list or tuple of 2-D tensors, got {type(seq).__name__}")
    if len(base_A) != len(orth_A):
        raise ValueError(f"base_A and orth_A must have the same length (one pair per layer), "
                         f"got {len(base_A)} and {len(orth_A)}")
    if len(base_A) == 0:
        raise ValueError("base_A and orth_A must hold at least one pair of tensors, got empty sequences")
    named = []
    for i, (b, o) in enumerate(zip(base_A, orth_A)):
        _checks.tensor(f"base_A[{i}]", b, ndim=2)
        _checks.tensor(f"orth_A[{i}]", o, ndim=2)
        if b.shape[1] != o.shape[1]:
            raise ValueError(f"base_A[{i}] [r1, d] and orth_A[{i}] [r2, d] must share d, "
                             f"got {list(b.shape)} and {list(o.shape)}")
        named += [(f"base_A[{i}]", b), (f"orth_A[{i}]", o)]
    device = _checks.same_device(named)
    grad = _run.needs_grad(*base_A, *orth_A)
    be = resolve_backend(_OP, backend, device, accumulate_dtype(*[t.dtype for t in [*base_A, *orth_A]]), 0, grad)
    base_A = [t.contiguous() for t in base_A]
    orth_A = [t.contiguous() for t in orth_A]
    (penalty,) = _run.call(_OP, be, (base_A, orth_A), eager=_eager, custom_op=_penalty_op, outputs=1,
                           grad=grad)
    return penalty
