"""Backend registry: which implementations exist, which can run here, and which one a call uses.

A *backend* is a family of implementations of the public ops (``route``, ``molora_linear``,
``lora_linear``, ``orthogonal_penalty``):

=============  ====================================================================================
``reference``  the authors' dense method (every expert for every token, stack, gather), differentiated
               by plain autograd: the benchmark baseline and a test oracle, never chosen by ``auto``
``torch``      portable PyTorch (CPU and CUDA): gating in rank space, dense-masked or grouped
``cuda``       the compiled extension ``medcare_kernels._C`` (``csrc/``): route, orthogonal_penalty and
               the molora_linear decode path; the rest delegates to ``torch`` (see its package doc).
               Available when the extension was built and loaded and the tensors are on a GPU
``triton``     fused Triton kernels (:mod:`medcare_kernels.triton`): CUDA GPUs, or the CPU under
               ``TRITON_INTERPRET=1`` (slow; for tests); ``auto``'s choice for CUDA tensors
=============  ====================================================================================

Each backend provides, per op, a module ``<package>.<op>`` (or a module registered with
:func:`register_impl`) with two functions whose signatures are fixed per op (see the op modules under
:mod:`medcare_kernels.ops`): ``forward(...)`` and ``backward(...)``. The reference backend instead
provides ``apply(...)``, plain differentiable PyTorch. Modules are imported lazily, on first use.

Selection (:func:`resolve_backend`): an explicit name wins; ``"auto"`` takes ``MEDCARE_BACKEND`` when
it is set, else the op's preference for the tensors' device (CPU -> ``torch``). A backend that is
asked for by name but cannot run raises :class:`BackendUnavailableError` saying what is missing; there
is never a silent fallback.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable, Sequence
from types import ModuleType

import torch

from medcare_kernels import _extension

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "backend_unavailable_reason",
    "get_impl",
    "pick_fast",
    "register_impl",
    "resolve_backend",
]

ENV_VAR = "MEDCARE_BACKEND"


def _always(device: torch.device) -> str | None:
    return None


def _cuda_reason(device: torch.device) -> str | None:
    """None when the compiled extension loaded and ``device`` is a GPU; else what is missing and how
    to build it."""
    return _extension.unavailable_reason(device)


#: Whether triton is installed, looked up once without importing it. Not per call: ``resolve_backend``
#: runs inside ``torch.compile``d code, and dynamo refuses to trace ``importlib.util.find_spec``
#: (torch 2.11: "Attempted to call function marked as skipped", a graph break under fullgraph=True).
_TRITON_INSTALLED: bool = importlib.util.find_spec("triton") is not None


def _triton_reason(device: torch.device) -> str | None:
    """None when Triton kernels can run on ``device``: triton is installed (checked without importing
    it) and the device is CUDA, or the CPU with ``TRITON_INTERPRET=1`` (the interpreter, for tests)."""
    if not _TRITON_INSTALLED:
        return "the triton package is not installed (pip install triton; it ships with torch's CUDA wheels on Linux)"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return None
        return ("triton kernels need a CUDA device; on the CPU they run only under the interpreter "
                "(set TRITON_INTERPRET=1 before the first call; slow, meant for tests)")
    return f"triton kernels do not run on {device.type} devices"


# name -> (package holding one module per op, why it cannot run on a device or None).
# Listed in the order ``available_backends`` reports them.
_BACKENDS: dict[str, tuple[str, Callable[[torch.device], str | None]]] = {
    "reference": ("medcare_kernels.backends.reference", _always),
    "torch": ("medcare_kernels.backends.pytorch", _always),
    "cuda": ("medcare_kernels.backends.cuda", _cuda_reason),
    "triton": ("medcare_kernels.triton", _triton_reason),
}

#: Every backend name the library knows.
BACKENDS: tuple[str, ...] = tuple(_BACKENDS)

#: Backends ``auto`` may pick for CUDA tensors, fastest first (the op's ``choose`` refines this).
_FAST_CUDA_BACKENDS: tuple[str, ...] = tuple(b for b in ("cuda", "triton") if b in _BACKENDS)

_registered: dict[tuple[str, str], ModuleType | str] = {}
_loaded: dict[tuple[str, str], ModuleType] = {}


class BackendUnavailableError(ValueError):
    """A backend was asked for by name but cannot run for these tensors on this machine."""


def register_impl(op: str, backend: str, module: ModuleType | str) -> None:
    """Register ``module`` (or a dotted module path, imported on first use) as ``backend``'s ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _registered[(op, backend)] = module
    _loaded.pop((op, backend), None)


def _module_path(op: str, backend: str) -> str | ModuleType:
    return _registered.get((op, backend), f"{_BACKENDS[backend][0]}.{op}")


def backend_unavailable_reason(backend: str, device: torch.device | str | None = None) -> str | None:
    """Why ``backend`` cannot run on ``device`` (default: CUDA when visible, else CPU); None if it can."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {backend!r}")
    device = _default_device() if device is None else torch.device(device)
    return _BACKENDS[backend][1](device)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends that can run on ``device`` (default: CUDA when visible, else CPU).

    On a CPU-only machine this is ``["reference", "torch"]``.
    """
    return [b for b in BACKENDS if backend_unavailable_reason(b, device) is None]


def resolve_backend(
    requested: str | None,
    device: torch.device,
    op: str,
    choose: Callable[[Sequence[str]], str] | None = None,
) -> str:
    """The backend an ``op`` call on ``device`` runs with.

    ``requested`` is a backend name or ``"auto"``/None. With ``"auto"`` the ``MEDCARE_BACKEND``
    environment variable wins when set; otherwise CPU tensors get ``torch`` and CUDA tensors get
    ``choose(available)`` (the op's measured preference for the shape), or ``torch`` without one.
    """
    if requested is None:
        requested = "auto"
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a str (one of {BACKENDS} or 'auto'), got {type(requested).__name__}")
    source = "backend"
    if requested == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env != "auto":
            requested, source = env, ENV_VAR
    if requested == "auto":
        if device.type == "cuda" and choose is not None:
            fast = [b for b in _FAST_CUDA_BACKENDS if backend_unavailable_reason(b, device) is None]
            return choose(fast) if fast else "torch"
        return "torch"
    if requested not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS} or 'auto', got {requested!r}")
    reason = backend_unavailable_reason(requested, device)
    if reason is not None:
        raise BackendUnavailableError(f"{source}={requested!r} cannot run {op}: {reason}")
    return requested


def pick_fast(available: Sequence[str], dtype: torch.dtype, order: Sequence[str]) -> str:
    """``auto``'s pick for CUDA tensors: the first backend of ``order`` (an op's preference, fastest
    first) that can run, else ``torch``; always ``torch`` for float64 (no 64-bit kernels)."""
    if dtype != torch.float64:
        for name in order:
            if name in available:
                return name
    return "torch"


def get_impl(op: str, backend: str) -> ModuleType:
    """The module implementing ``op`` for ``backend`` (imported on first use)."""
    key = (op, backend)
    mod = _loaded.get(key)
    if mod is None:
        target = _module_path(op, backend)
        mod = importlib.import_module(target) if isinstance(target, str) else target
        _loaded[key] = mod
    return mod
