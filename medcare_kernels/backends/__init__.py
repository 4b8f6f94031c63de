"""Backend registry: which implementations exist, which can run here, and which one a call uses.

A *backend* is a family of implementations of the public ops (``route``, ``molora_linear``,
``lora_linear``, ``orthogonal_penalty``), one module per op at ``medcare_kernels/backends/<name>/<op>.py``:

=============  ====================================================================================
``reference``  the authors' dense method (every expert for every token, stack, gather), differentiated
               by plain autograd: the benchmark baseline and a test oracle, never chosen by ``auto``.
               Its modules provide ``apply(...)``.
``torch``      portable PyTorch (CPU and CUDA): gating in rank space, dense-masked or grouped
``cuda``       the compiled extension ``medcare_kernels._C`` (``csrc/``): route, orthogonal_penalty and
               the molora_linear decode path; the rest delegates to ``torch`` (see its package doc).
               Available when the extension was built and loaded and the tensors are on a GPU
``triton``     fused Triton kernels: CUDA GPUs, or the CPU under ``TRITON_INTERPRET=1`` (slow; tests)
=============  ====================================================================================

Every backend but the reference provides per op ``forward(...)`` and ``backward(...)`` with the
signatures of the backend contract (:mod:`medcare_kernels.ops`). Modules are imported on first use.

Selection (:func:`resolve_backend`): an explicit name wins; ``"auto"`` takes ``MEDCARE_BACKEND`` when it
is set, else ``torch`` for CPU tensors and float64, else the first backend of the op's preference
(:data:`medcare_kernels.dispatch.PREFERENCES`) that can run. A backend asked for by name that cannot
run raises :class:`BackendUnavailableError` saying what is missing; there is never a silent fallback.
:func:`record_backends` records which backend each call resolved to.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from collections.abc import Iterator
from types import ModuleType

import torch

from medcare_kernels import _extension, dispatch

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "backend_unavailable_reason",
    "get_impl",
    "record_backends",
    "resolve_backend",
]

#: Every backend name the library knows, in the order ``available_backends`` reports them.
BACKENDS: tuple[str, ...] = dispatch.BACKEND_NAMES

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


def _unavailable(backend: str, device: torch.device) -> str | None:
    if backend == "cuda":
        return _extension.unavailable_reason(device)
    if backend == "triton":
        return _triton_reason(device)
    return None  # reference and torch run wherever torch does


_loaded: dict[tuple[str, str], ModuleType] = {}
_recorders: list[dict[str, set[str]]] = []


class BackendUnavailableError(ValueError):
    """A backend was asked for by name but cannot run for these tensors on this machine."""


def backend_unavailable_reason(backend: str, device: torch.device | str | None = None) -> str | None:
    """Why ``backend`` cannot run on ``device`` (default: CUDA when visible, else CPU); None if it can."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {backend!r}")
    return _unavailable(backend, _default_device() if device is None else torch.device(device))


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends that can run on ``device`` (default: CUDA when visible, else CPU).

    On a CPU-only machine this is ``["reference", "torch"]``.
    """
    return [b for b in BACKENDS if backend_unavailable_reason(b, device) is None]


def resolve_backend(op: str, requested: str | None, device: torch.device, dtype: torch.dtype, tokens: int = 0,
                    needs_grad: bool = True) -> str:
    """The backend an ``op`` call runs with.

    ``requested``: a backend name, or ``"auto"``/None. With ``"auto"`` the ``MEDCARE_BACKEND`` environment
    variable wins when set; otherwise CPU tensors and float64 (``dtype``: the call's accumulation dtype)
    get ``torch``, and CUDA tensors the first runnable backend of
    ``dispatch.preferred(op, tokens, needs_grad)``, else ``torch``.
    """
    if requested is None:
        requested = "auto"
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a str (one of {BACKENDS} or 'auto'), got {type(requested).__name__}")
    source = "backend"
    if requested == "auto":
        env = dispatch.knob("MEDCARE_BACKEND")
        if env != "auto":
            requested, source = env, "MEDCARE_BACKEND"
    if requested == "auto":
        name = "torch"
        if device.type == "cuda" and dtype != torch.float64:
            name = next((b for b in dispatch.preferred(op, tokens, needs_grad) if _unavailable(b, device) is None),
                        "torch")
    elif requested not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS} or 'auto', got {requested!r}")
    else:
        reason = _unavailable(requested, device)
        if reason is not None:
            raise BackendUnavailableError(f"{source}={requested!r} cannot run {op}: {reason}")
        name = requested
    for rec in _recorders:
        rec.setdefault(op, set()).add(name)
    return name


@contextlib.contextmanager
def record_backends() -> Iterator[dict[str, set[str]]]:
    """Within the block, record which backend every op call resolved to: yields ``{op: {backend, ...}}``.

    Calls traced by ``torch.compile`` are recorded when they are traced."""
    rec: dict[str, set[str]] = {}
    _recorders.append(rec)
    try:
        yield rec
    finally:
        _recorders.remove(rec)


def get_impl(op: str, backend: str) -> ModuleType:
    """The module implementing ``op`` for ``backend``: ``medcare_kernels.backends.<pkg>.<op>`` (imported on
    first use; the torch backend's package is ``pytorch``, so it never shadows ``torch``)."""
    key = (op, backend)
    mod = _loaded.get(key)
    if mod is None:
        pkg = "pytorch" if backend == "torch" else backend
        mod = _loaded[key] = importlib.import_module(f"medcare_kernels.backends.{pkg}.{op}")
    return mod
