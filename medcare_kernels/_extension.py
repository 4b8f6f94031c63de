"""The compiled CUDA extension ``medcare_kernels._C``: loaded if present, with the reason if not.

Importing ``_C`` registers ``torch.ops.medcare_kernels.{route_fwd_cuda, route_bwd_cuda,
orthogonal_penalty_fwd_cuda, orthogonal_penalty_bwd_cuda, molora_decode_cuda}`` (CUDA kernels; on CPU
tensors they check their arguments and raise). This module registers their fake (meta)
implementations, so shapes propagate under ``torch.compile`` and on the meta device.

The ``cuda`` backend (:mod:`medcare_kernels.backends.cuda`) calls these ops; it is available when
:func:`unavailable_reason` returns None for the tensors' device.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

__all__ = ["BUILD_HINT", "OPS", "build_info", "compiled_archs", "load", "loaded", "unavailable_reason"]

BUILD_HINT = (
    "build it in a checkout with `MEDCARE_BUILD_CUDA=1 pip install --no-build-isolation -e .` "
    "(needs nvcc and a CUDA build of torch; `make wheel` builds a wheel to install elsewhere)"
)

#: The compiled ops and their schemas (what ``csrc/registration.cpp`` defines).
OPS: dict[str, str] = {
    "route_fwd_cuda": "route_fwd_cuda(Tensor logits, int top_k) -> (Tensor weights, Tensor indices)",
    "route_bwd_cuda": "route_bwd_cuda(Tensor grad_weights, Tensor logits, Tensor weights, Tensor indices) -> Tensor",
    "orthogonal_penalty_fwd_cuda": "orthogonal_penalty_fwd_cuda(Tensor[] base_A, Tensor[] orth_A) -> Tensor",
    "orthogonal_penalty_bwd_cuda": (
        "orthogonal_penalty_bwd_cuda(Tensor grad, Tensor[] base_A, Tensor[] orth_A, bool need_base, bool need_orth)"
        " -> (Tensor[] grad_base_A, Tensor[] grad_orth_A)"),
    "molora_decode_cuda": (
        "molora_decode_cuda(Tensor x, Tensor weight, Tensor? bias, Tensor router_weight, Tensor? router_bias, "
        "Tensor lora_A, Tensor lora_B, Tensor? shared_A, Tensor? shared_B, Tensor? lora_x, int top_k, "
        "float scaling) -> (Tensor y, Tensor logits, Tensor weights, Tensor indices, Tensor z)"),
}

_module: ModuleType | None = None
_error: str | None = None
_attempted = False


def load() -> ModuleType | None:
    """Import ``medcare_kernels._C`` once; None (and :func:`unavailable_reason` says why) if it fails."""
    global _module, _error, _attempted
    if _attempted:
        return _module
    _attempted = True
    try:
        _module = importlib.import_module("medcare_kernels._C")
    except ModuleNotFoundError as exc:
        if exc.name != "medcare_kernels._C":
            _error = f"medcare_kernels._C could not be imported ({exc})"
        else:
            _error = "the compiled CUDA extension medcare_kernels._C is not built"
    except (ImportError, OSError) as exc:  # e.g. undefined symbols: built against another torch
        _error = (f"medcare_kernels._C failed to load ({exc}); it must be built against the installed torch "
                  f"{torch.__version__}, so rebuild it")
    else:
        _register_fakes()
    return _module


def loaded() -> bool:
    return load() is not None


def unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why the compiled ops cannot run on ``device`` (None: they can). Without a device: whether the
    extension loaded at all."""
    if load() is None:
        return f"{_error}: {BUILD_HINT}"
    if device is not None and torch.device(device).type != "cuda":
        return f"the cuda backend runs CUDA tensors only, got device {str(device)!r}"
    if device is not None and not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    return None


def compiled_archs() -> dict[str, list[str]]:
    """The GPU architectures compiled in, e.g. ``{"sass": ["8.0", "9.0"], "ptx": ["9.0"]}`` (empty if not built)."""
    mod = load()
    if mod is None:
        return {"sass": [], "ptx": []}

    def fmt(spec: str) -> list[str]:
        return [f"{a[:-1]}.{a[-1]}" if a.isdigit() else f"{a[:-2]}.{a[-2:]}" for a in spec.split(",") if a]
    return {"sass": fmt(mod.sass_archs), "ptx": fmt(mod.ptx_archs)}


def build_info() -> dict[str, object]:
    """What the loaded extension was built for, or why it did not load."""
    mod = load()
    if mod is None:
        return {"loaded": False, "reason": unavailable_reason()}
    cuda = mod.cuda_runtime_version
    return {
        "loaded": True,
        "path": mod.__file__,
        "archs": compiled_archs(),
        "virtual_archs": [f"{int(a) // 100}.{int(a) % 100 // 10}" for a in mod.device_archs.split(",") if a],
        "built_with_torch": mod.torch_version,
        "built_with_cuda": f"{cuda // 1000}.{cuda % 1000 // 10}",
    }


def runs_on(capability: tuple[int, int]) -> bool:
    """Whether the compiled kernels can run on a GPU of this compute capability: machine code for the
    same major version and a lower or equal minor one, or PTX for a lower or equal capability."""
    archs = compiled_archs()

    def cap(a: str) -> tuple[int, int]:
        major, minor = a.split(".")
        return int(major), int(minor.rstrip("af") or 0)
    sass = any(cap(a)[0] == capability[0] and cap(a)[1] <= capability[1] for a in archs["sass"])
    return sass or any(cap(a) <= capability for a in archs["ptx"])


def _register_fakes() -> None:
    """Fake implementations: output shapes and dtypes only (FakeTensor / meta device)."""
    lib = "medcare_kernels::"

    @torch.library.register_fake(lib + "route_fwd_cuda")
    def _(logits, top_k):
        T = logits.shape[0]
        return logits.new_empty(T, top_k, dtype=torch.float32), logits.new_empty(T, top_k, dtype=torch.int64)

    @torch.library.register_fake(lib + "route_bwd_cuda")
    def _(grad_weights, logits, weights, indices):
        return logits.new_empty(logits.shape, dtype=torch.float32)

    @torch.library.register_fake(lib + "orthogonal_penalty_fwd_cuda")
    def _(base_A, orth_A):
        return base_A[0].new_empty((), dtype=torch.float32)

    @torch.library.register_fake(lib + "orthogonal_penalty_bwd_cuda")
    def _(grad, base_A, orth_A, need_base, need_orth):
        return ([torch.empty_like(t) for t in base_A] if need_base else [],
                [torch.empty_like(t) for t in orth_A] if need_orth else [])

    @torch.library.register_fake(lib + "molora_decode_cuda")
    def _(x, weight, bias, router_weight, router_bias, lora_A, lora_B, shared_A, shared_B, lora_x, top_k, scaling):
        T = x.shape[0]
        E, r = lora_A.shape[0], lora_A.shape[1]
        r_s = 0 if shared_A is None else shared_A.shape[0]
        f32 = torch.float32
        return (x.new_empty(T, weight.shape[0]), x.new_empty(T, E, dtype=f32), x.new_empty(T, top_k, dtype=f32),
                x.new_empty(T, top_k, dtype=torch.int64), x.new_empty(T, top_k * r + r_s, dtype=f32))


load()
