"""``molora_linear``: a frozen linear plus top-k routed LoRA experts and always-on shared experts."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from medcare_kernels import _checks
from medcare_kernels.backends import get_impl, resolve_backend
from medcare_kernels.dispatch import accumulate_dtype
from medcare_kernels.ops import _grads, _run

_OP = "molora_linear"
# Order of the differentiable inputs, shared by `needs` and the backward's outputs.
_GRAD_INPUTS = ("x", "weight", "bias", "router_weight", "router_bias", "lora_A", "lora_B",
                "shared_A", "shared_B", "lora_x")


@torch.library.custom_op("medcare_kernels::molora_linear", mutates_args=())
def _molora_linear_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], router_weight: Tensor, router_bias: Optional[Tensor],
    lora_A: Tensor, lora_B: Tensor, shared_A: Optional[Tensor], shared_B: Optional[Tensor],
    lora_x: Optional[Tensor], top_k: int, scaling: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    out = get_impl(_OP, backend).forward(x, weight, bias, router_weight, router_bias, lora_A, lora_B,
                                         shared_A, shared_B, lora_x, top_k, scaling)
    return tuple(_grads.pack(out, x, [x, weight, bias, router_weight, router_bias, lora_A, lora_B, shared_A,
                                      shared_B, lora_x]))


@_molora_linear_op.register_fake
def _(x, weight, bias, router_weight, router_bias, lora_A, lora_B, shared_A, shared_B, lora_x, top_k,
      scaling, backend):
    T = x.shape[0]
    E, r, _ = lora_A.shape
    r_s = 0 if shared_A is None else shared_A.shape[0]
    acc = accumulate_dtype(x.dtype, lora_A.dtype, router_weight.dtype)
    return (x.new_empty(T, weight.shape[0]), x.new_empty(T, E, dtype=acc), x.new_empty(T, top_k, dtype=acc),
            x.new_empty(T, top_k, dtype=torch.int64), x.new_empty(T, top_k * r + r_s, dtype=acc))


@torch.library.custom_op("medcare_kernels::molora_linear_backward", mutates_args=())
def _molora_linear_backward_op(
    grad_y: Tensor, grad_logits: Optional[Tensor], x: Tensor, lora_x: Optional[Tensor], weight: Tensor,
    router_weight: Tensor, lora_A: Tensor, lora_B: Tensor, shared_A: Optional[Tensor],
    shared_B: Optional[Tensor], logits: Tensor, weights: Tensor, indices: Tensor, z: Tensor, top_k: int,
    scaling: float, needs: list[bool], backend: str,
) -> list[Tensor]:
    grads = get_impl(_OP, backend).backward(grad_y, grad_logits, x, lora_x, weight, router_weight, lora_A,
                                            lora_B, shared_A, shared_B, logits, weights, indices, z, top_k,
                                            scaling, needs)
    return _grads.pack(grads, x, [grad_y, grad_logits, x, lora_x, weight, router_weight, lora_A, lora_B,
                                  shared_A, shared_B, logits, weights, indices, z])


@_molora_linear_backward_op.register_fake
def _(grad_y, grad_logits, x, lora_x, weight, router_weight, lora_A, lora_B, shared_A, shared_B, logits,
      weights, indices, z, top_k, scaling, needs, backend):
    def sd(t):
        return None if t is None else (t.shape, t.dtype)
    d_out, E = weight.shape[0], lora_A.shape[0]
    return _grads.fake([sd(x), sd(weight), ((d_out,), weight.dtype), sd(router_weight),
                        ((E,), router_weight.dtype), sd(lora_A), sd(lora_B), sd(shared_A), sd(shared_B), sd(x)],
                       needs, x)


def _setup(ctx, inputs, output):
    (x, weight, _bias, router_weight, _router_bias, lora_A, lora_B, shared_A, shared_B, lora_x, top_k,
     scaling, backend) = inputs
    _y, logits, weights, indices, z = output
    ctx.save_for_backward(x, lora_x, weight, router_weight, lora_A, lora_B, shared_A, shared_B, logits,
                          weights, indices, z)
    ctx.top_k, ctx.scaling, ctx.backend = top_k, scaling, backend


def _backward(ctx, grad_y, grad_logits, _gw, _gi, _gz):
    needs = list(ctx.needs_input_grad[: len(_GRAD_INPUTS)])
    saved = ctx.saved_tensors
    grad_y, grad_logits = _grad_inputs(saved, grad_y, grad_logits)
    grads = _molora_linear_backward_op(grad_y, grad_logits, *saved, ctx.top_k, ctx.scaling, needs, ctx.backend)
    return (*_grads.unpack(grads, needs), None, None, None)


_molora_linear_op.register_autograd(_backward, setup_context=_setup)


def _grad_inputs(saved, grad_y, grad_logits):
    """The incoming gradients as the backends take them (``saved``: x first, the base weight third)."""
    return _run.dense_grad(grad_y, saved[0], saved[2]), None if grad_logits is None else grad_logits.contiguous()


class _MoLoRAFunction(torch.autograd.Function):
    """The eager path (:mod:`medcare_kernels.ops._run`): the custom op's forward and backward, called directly."""

    @staticmethod
    def forward(ctx, impl, x, weight, bias, router_weight, router_bias, lora_A, lora_B, shared_A, shared_B, lora_x,
                top_k, scaling):
        y, logits, weights, indices, z = impl.forward(x, weight, bias, router_weight, router_bias, lora_A, lora_B,
                                                      shared_A, shared_B, lora_x, top_k, scaling)
        ctx.save_for_backward(x, lora_x, weight, router_weight, lora_A, lora_B, shared_A, shared_B, logits,
                              weights, indices, z)
        ctx.impl, ctx.top_k, ctx.scaling = impl, top_k, scaling
        ctx.set_materialize_grads(False)
        return y, logits

    @staticmethod
    def backward(ctx, grad_y, grad_logits):
        needs = ctx.needs_input_grad[1: 1 + len(_GRAD_INPUTS)]
        saved = ctx.saved_tensors
        grad_y, grad_logits = _grad_inputs(saved, grad_y, grad_logits)
        grads = ctx.impl.backward(grad_y, grad_logits, *saved, ctx.top_k, ctx.scaling, needs)
        return (None, *grads, None, None)


def _check(x, weight, bias, router_weight, router_bias, lora_A, lora_B, shared_A, shared_B, top_k, scaling,
           lora_x):
    d_out, d_in = _checks.base_linear(x, weight, bias)
    router_weight = _checks.tensor("router_weight", router_weight, ndim=2)
    E = router_weight.shape[0]
    _checks.shape("router_weight", router_weight, (E, d_in), "[E, d_in]")
    if E < 1:
        raise ValueError("router_weight must have at least one expert (E >= 1), got shape [0, d_in]")
    if _checks.optional_tensor("router_bias", router_bias, ndim=1) is not None:
        _checks.shape("router_bias", router_bias, (E,), "[E]")
        _checks.same_dtype("router_bias", router_bias, "router_weight", router_weight)
    lora_A = _checks.tensor("lora_A", lora_A, ndim=3)
    r = lora_A.shape[1]
    _checks.shape("lora_A", lora_A, (E, r, d_in), "[E, r, d_in]")
    _checks.rank("lora_A", r, "r", "lora_A is [E, r, d_in]")
    lora_B = _checks.tensor("lora_B", lora_B, ndim=3)
    _checks.shape("lora_B", lora_B, (E, d_out, r), "[E, d_out, r] (r from lora_A)")
    _checks.same_dtype("lora_B", lora_B, "lora_A", lora_A)
    if (shared_A is None) != (shared_B is None):
        raise ValueError("shared_A and shared_B must be given together (or both None), got only "
                         + ("shared_A" if shared_B is None else "shared_B"))
    if shared_A is not None:
        shared_A = _checks.tensor("shared_A", shared_A, ndim=2)
        r_s = shared_A.shape[0]
        _checks.shape("shared_A", shared_A, (r_s, d_in), "[r_s, d_in]")
        _checks.rank("shared_A", r_s, "r_s", "shared_A is [r_s, d_in]; pass shared_A=shared_B=None for no shared "
                     "experts")
        _checks.tensor("shared_B", shared_B, ndim=2)
        _checks.shape("shared_B", shared_B, (d_out, r_s), "[d_out, r_s] (r_s from shared_A)")
        _checks.same_dtype("shared_A", shared_A, "lora_A", lora_A)
        _checks.same_dtype("shared_B", shared_B, "lora_A", lora_A)
    top_k = _checks.integer("top_k", top_k, low=1, high=E, high_name="E")
    scaling = _checks.real("scaling", scaling)
    _checks.lora_x(lora_x, x)
    device = _checks.same_device([("x", x), ("weight", weight), ("bias", bias), ("router_weight", router_weight),
                                  ("router_bias", router_bias), ("lora_A", lora_A), ("lora_B", lora_B),
                                  ("shared_A", shared_A), ("shared_B", shared_B), ("lora_x", lora_x)])
    return top_k, scaling, device



def molora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, router_weight: Tensor, router_bias: Tensor | None,
    lora_A: Tensor, lora_B: Tensor, shared_A: Tensor | None = None, shared_B: Tensor | None = None, *,
    top_k: int, scaling: float, lora_x: Tensor | None = None, backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Mixture-of-LoRA linear (MedCare stage 1).

    ``y = x @ W.T + b + sum_j w_j * s * (lx @ A[i_j].T @ B[i_j].T) + s * (lx @ A_s.T @ B_s.T)`` with
    ``(w, i) = route(x @ W_r.T + b_r, top_k)`` and ``lx = lora_x if given else x``.

    Args:
        x: ``[..., d_in]``; the base GEMM and the router read it.
        weight: ``[d_out, d_in]`` frozen base weight, x's dtype. bias: ``[d_out]`` or None.
        router_weight: ``[E, d_in]``; router_bias: ``[E]`` or None (router_weight's dtype).
        lora_A: ``[E, r, d_in]``; lora_B: ``[E, d_out, r]`` (one dtype for all LoRA tensors).
        shared_A: ``[r_s, d_in]``; shared_B: ``[d_out, r_s]``; both or neither.
        top_k: experts per token, ``1 <= top_k <= E``. scaling: LoRA scale ``s`` (alpha/r).
        lora_x: the LoRA input when it differs from x (``dropout(x)`` in training), x's shape and dtype.
        backend: ``"auto"``, or a name from :func:`medcare_kernels.available_backends`.

    Returns:
        ``(y [..., d_out] in x's dtype, router_logits [T, E] float32)`` with ``T = x.numel() // d_in``
        (float64 logits for float64 inputs). Differentiable w.r.t. every floating input.

    Non-finite values (every backend but the reference, which computes every expert for every token): a
    NaN or inf in token t's ``x``/``lora_x`` makes row t of ``y`` and of the logits non-finite and leaves
    every other row as it would be (up to the frozen base GEMM's own behaviour); a row with a non-finite
    logit is routed to k distinct valid experts with NaN weights; an expert no token chose is never read,
    whatever its parameters hold, and gets exact zero gradients. The gradients of the parameters a
    poisoned row meets (router, shared experts, chosen experts) may be non-finite.
    """
    top_k, scaling, device = _check(x, weight, bias, router_weight, router_bias, lora_A, lora_B, shared_A,
                                    shared_B, top_k, scaling, lora_x)
    grad = _run.needs_grad(x, weight, bias, router_weight, router_bias, lora_A, lora_B, shared_A, shared_B, lora_x)
    be = resolve_backend(_OP, backend, device, accumulate_dtype(x.dtype, lora_A.dtype, router_weight.dtype),
                         x.numel() // x.shape[-1], grad)
    x2, lx2 = _checks.tokens_2d(x, lora_x)
    y, logits = _run.call(_OP, be, (x2, weight, bias, router_weight, router_bias, lora_A, lora_B, shared_A, shared_B,
                                    lx2, top_k, scaling),
                          eager=_MoLoRAFunction.apply, custom_op=_molora_linear_op, outputs=2, grad=grad)
    return y.reshape(*x.shape[:-1], weight.shape[0]), logits
