"""How a public op call runs, once its arguments are checked and its backend resolved.

* ``reference``: the backend's ``apply`` (plain differentiable PyTorch: the authors' method).
* traced by ``torch.compile``: the op's ``torch.library`` custom op, whose fake implementation and
  registered autograd formula let dynamo and AOT autograd trace through it (``fullgraph=True``).
* eager, some input requires grad: ``eager(impl, *args)``, the op's ``torch.autograd.Function``, which calls
  the backend's ``forward`` and ``backward`` directly. Same code, same saved state as the custom op, without the
  custom-op dispatch (about a third of a small call's host time; benchmarks/RESULTS.md, host overhead).
* eager, nothing requires grad (inference): the backend's ``forward`` alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from medcare_kernels.backends import get_impl


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will record a call on ``tensors``: grad mode is on and one of them requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def dense_grad(grad: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A linear op's incoming output gradient as the backends take it: contiguous [T, d_out], zeros when
    the output got none (only another output, e.g. the router logits, had a gradient)."""
    if grad is None:
        return torch.zeros(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    return grad.contiguous()


def call(op: str, backend: str, args: Sequence, *, eager: Callable, custom_op: Callable, outputs: int,
         grad: bool) -> tuple:
    """The first ``outputs`` results of ``op`` on ``args`` with ``backend`` (see the module doc)."""
    impl = get_impl(op, backend)
    if backend == "reference":
        out = impl.apply(*args)
    elif torch.compiler.is_compiling():
        out = custom_op(*args, backend)
    elif grad:
        out = eager(impl, *args)
    else:
        out = impl.forward(*args)
    return (out,) if isinstance(out, torch.Tensor) else tuple(out[:outputs])
