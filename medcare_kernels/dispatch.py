"""Who runs what, declared as data: every rule ``backend="auto"`` and the backends follow, in one place.

Three tables:

* :data:`PREFERENCES`: per op, the backends ``auto`` tries for CUDA tensors, fastest first (CPU
  tensors always get ``torch``; float64 always gets ``torch``: no 64-bit kernels).
* :data:`THRESHOLDS`: the token counts and widths where a backend switches formulation or kernel.
* :data:`KNOBS`: every ``MEDCARE_*`` environment variable: name, choices, default, what it overrides.

:func:`medcare_kernels.backends.resolve_backend` reads :data:`PREFERENCES`; the backends read
:data:`THRESHOLDS` through the functions below (:func:`torch_formulation`, :func:`triton_path`,
:func:`triton_base`); ``medcare info`` prints all three; the tests' environment cleanup and the README's
tables are checked against :data:`KNOBS`. Every number cites the measurement behind it in
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["KNOBS", "PREFERENCES", "THRESHOLDS", "Knob", "Preference", "Threshold", "accumulate_dtype", "knob",
           "preferred", "torch_formulation", "triton_base", "triton_path"]

BACKEND_NAMES = ("reference", "torch", "cuda", "triton")


def accumulate_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype every backend accumulates LoRA and routing math in: float64 when any input is float64
    (gradcheck), float32 otherwise (float16/bfloat16/float32 inputs)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


# ---- environment knobs ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Knob:
    """One ``MEDCARE_*`` environment variable. ``scope``: ``runtime`` (read on use), ``import`` (read when
    its module is first imported), ``build`` (``setup.py``) or ``tests`` (the test suite)."""

    name: str
    choices: tuple[str, ...]  # () means free-form
    default: str
    overrides: str
    scope: str = "runtime"


KNOBS: tuple[Knob, ...] = (
    Knob("MEDCARE_BACKEND", ("auto", *BACKEND_NAMES), "auto",
         "the backend of every op call made with backend='auto' (an explicit backend= argument still wins)"),
    Knob("MEDCARE_MOLORA_FORMULATION", ("auto", "dense", "grouped"), "auto",
         "the torch backend's molora_linear formulation (torch_formulation)"),
    Knob("MEDCARE_TRITON_MOLORA_PATH", ("auto", "dense", "grouped"), "auto",
         "the triton backend's molora_linear path (triton_path)"),
    Knob("MEDCARE_TRITON_BASE", ("auto", "triton", "cublas"), "auto",
         "how the triton backend computes the frozen base GEMM (triton_base)"),
    Knob("MEDCARE_TRITON_AUTOTUNE", ("1", "0"), "1",
         "0: every Triton kernel compiles only its first config (no tuning; the GPU test run uses it)", "import"),
    Knob("MEDCARE_BUILD_CUDA", ("auto", "1", "0", "true", "false", "yes", "no", "on", "off"), "auto",
         "whether setup.py compiles the CUDA extension: 1 builds it or fails loudly, 0 skips it, auto builds it "
         "when torch has CUDA and nvcc is found (case-insensitive)", "build"),
    Knob("MEDCARE_TEST_SEED", (), "random", "the test suite's random seed (printed in the pytest header)", "tests"),
)
_KNOBS = {k.name: k for k in KNOBS}


def knob(name: str) -> str:
    """The value of environment knob ``name`` (its default when unset or empty), validated against its
    choices: a bad value raises ``ValueError`` naming the variable and the choices."""
    spec = _KNOBS[name]
    value = os.environ.get(name, "").strip() or spec.default
    if spec.choices and value not in spec.choices:
        raise ValueError(f"{name} must be one of {list(spec.choices)}, got {value!r}")
    return value


# ---- auto's preferences ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preference:
    """``auto``'s order for CUDA tensors, fastest first; ``decode`` replaces it for calls that need no
    gradient with at most ``DECODE_MAX_TOKENS`` tokens (inference). ``evidence``: the measurement."""

    order: tuple[str, ...]
    decode: tuple[str, ...] = ()
    evidence: str = ""


PREFERENCES: dict[str, Preference] = {
    "route": Preference(("cuda", "triton"), evidence=(
        "H200: the compiled kernel was the fastest forward at every T (5-9x the torch backend; triton "
        "1.2-5.4x), forward+backward likewise (benchmarks/RESULTS.md, per-op table)")),
    "orthogonal_penalty": Preference(("cuda", "triton"), evidence=(
        "H200: the compiled kernel (every layer in one launch per pass, deterministic) 3.1-5.6x the torch "
        "forward, 2.5x with the backward; triton 2.1-3.3x (benchmarks/RESULTS.md, per-op table)")),
    "lora_linear": Preference(("triton",), evidence=(
        "only triton has LoRA kernels (the shrink and K-extended GEMM measured in molora_linear's rows)")),
    "molora_linear": Preference(("triton",), decode=("cuda", "triton"), evidence=(
        "H200: decode (T <= 64, no grad) 0.087-0.126 ms with cuda against 0.26-0.50 ms with triton; "
        "training at T=16384 1.41-1.55x the frozen linear with triton against 2.8-3.1x with torch "
        "(benchmarks/RESULTS.md, layer and per-op tables)")),
}


# ---- thresholds -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Threshold:
    name: str
    value: int
    rule: str
    evidence: str


THRESHOLDS: dict[str, Threshold] = {t.name: t for t in (
    Threshold("DECODE_MAX_TOKENS", 64,
              "molora_linear calls without gradients and with at most this many tokens use PREFERENCES' decode "
              "order (the cuda backend's decode kernels)",
              "benchmarks/RESULTS.md, per-op table (decode rows, T <= 64)"),
    Threshold("CUBLAS_BASE_MIN_TOKENS", 1024,
              "triton: from this many tokens the frozen base GEMM is cuBLAS and a kernel adds the LoRA term in "
              "place; below it the base runs inside the K-extended Triton GEMM",
              "benchmarks/RESULTS.md, H200 layer table: cuBLAS base faster at T=4096 and 16384, the Triton "
              "base at T=16"),
    Threshold("TRITON_GROUPED_MIN_WIDTH", 512,
              "triton molora_linear: the grouped path when the padded expert width E_R*R_PAD reaches this and "
              "k < E; dense-masked otherwise",
              "benchmarks/RESULTS.md, formulations"),
    Threshold("TORCH_CPU_GROUPED_SLOTS_PER_EXPERT", 16,
              "torch backend on the CPU, k < E: grouped when T*k >= this * E, or when 0 < T*k < E (decode: "
              "whole experts left unread); dense otherwise",
              "benchmarks/RESULTS.md, formulations (CPU)"),
    Threshold("TORCH_CUDA_GROUPED_MIN_WIDTH", 1024,
              "torch backend on CUDA, k < E: grouped only when E*r reaches this (the dense form needs no host "
              "synchronisation) and T*k >= TORCH_CUDA_GROUPED_SLOTS_PER_EXPERT * E",
              "benchmarks/RESULTS.md, formulations"),
    Threshold("TORCH_CUDA_GROUPED_SLOTS_PER_EXPERT", 64,
              "see TORCH_CUDA_GROUPED_MIN_WIDTH", "benchmarks/RESULTS.md, formulations"),
)}


def _t(name: str) -> int:
    return THRESHOLDS[name].value


def preferred(op: str, tokens: int, needs_grad: bool) -> tuple[str, ...]:
    """``auto``'s order of backends for an ``op`` call on CUDA tensors."""
    pref = PREFERENCES[op]
    if pref.decode and not needs_grad and tokens <= _t("DECODE_MAX_TOKENS"):
        return pref.decode
    return pref.order


def torch_formulation(tokens: int, experts: int, rank: int, top_k: int, device: torch.device) -> str:
    """The torch backend's ``molora_linear`` formulation, ``dense`` or ``grouped``
    (``MEDCARE_MOLORA_FORMULATION`` overrides). With ``k = E`` nothing is skipped: dense."""
    forced = knob("MEDCARE_MOLORA_FORMULATION")
    if forced != "auto":
        return forced
    if top_k >= experts:
        return "dense"
    slots = tokens * top_k
    if device.type == "cuda":
        wide = experts * rank >= _t("TORCH_CUDA_GROUPED_MIN_WIDTH")
        return "grouped" if wide and slots >= _t("TORCH_CUDA_GROUPED_SLOTS_PER_EXPERT") * experts else "dense"
    return "grouped" if (slots >= _t("TORCH_CPU_GROUPED_SLOTS_PER_EXPERT") * experts or 0 < slots < experts) \
        else "dense"


def triton_path(padded_width: int, experts: int, top_k: int) -> str:
    """The triton backend's ``molora_linear`` path for a padded expert width ``E_R * R_PAD``
    (``MEDCARE_TRITON_MOLORA_PATH`` overrides)."""
    forced = knob("MEDCARE_TRITON_MOLORA_PATH")
    if forced != "auto":
        return forced
    return "grouped" if (padded_width >= _t("TRITON_GROUPED_MIN_WIDTH") and top_k < experts) else "dense"


def triton_base(tokens: int) -> str:
    """How the triton backend computes the frozen base GEMM for ``tokens`` rows: ``triton`` (inside the
    K-extended kernel, the output written once) or ``cublas`` (``MEDCARE_TRITON_BASE`` overrides)."""
    forced = knob("MEDCARE_TRITON_BASE")
    if forced != "auto":
        return forced
    return "cublas" if tokens >= _t("CUBLAS_BASE_MIN_TOKENS") else "triton"
