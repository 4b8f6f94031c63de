"""Shared helpers of the Triton backend: dtype checks, padding sizes, autotune configs, the dot helper.

``TRITON_INTERPRET`` is read when this module is first imported (triton decides per ``@triton.jit``
decoration whether a kernel is interpreted): set it before the first call of a triton-backend op.
Under the interpreter every kernel uses one fixed small config (no autotuning) and dot operands are
upcast to float32 (the interpreter multiplies bfloat16 bit patterns as integers).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from medcare_kernels import dispatch

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
_INTERP = tl.constexpr(INTERPRET)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_dtypes(op: str, **tensors: torch.Tensor | None) -> None:
    """Raise ``TypeError`` for a dtype the Triton kernels do not implement (float64)."""
    for name, t in tensors.items():
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"the triton backend's {op} supports float16, bfloat16 and float32 tensors, got {name} "
                            f"with dtype {t.dtype}; use backend='torch' for float64 (e.g. gradcheck)")


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype rank-space operands are stored in for the tensor-core GEMMs: the inputs' common dtype,
    or float32 when they differ (e.g. bfloat16 activations with float32 LoRA parameters)."""
    first = dtypes[0]
    return first if all(d == first for d in dtypes) else torch.float32


def pow2(n: int, floor: int = 1) -> int:
    """The smallest power of two >= max(n, floor)."""
    n = max(int(n), int(floor), 1)
    return 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (4 under the interpreter, so split paths run in tests)."""
    if device.type != "cuda":
        return 4
    return _sms(device.index if device.index is not None else torch.cuda.current_device())


def split_k(tiles: int, k: int, device: torch.device, min_chunk: int = 512, cap: int = 32) -> int:
    """How many slices to split a reduction of length ``k`` into so that ``tiles`` output tiles fill the
    GPU: 1 when the tiles alone do, else enough to reach about two programs per SM, each slice at
    least ``min_chunk`` long (16 under the interpreter)."""
    sms = num_sms(device)
    if INTERPRET:
        min_chunk = 16
    if tiles >= sms:
        return 1
    return max(1, min(cdiv(2 * sms, max(tiles, 1)), cdiv(k, min_chunk), cap))


#: ``MEDCARE_TRITON_AUTOTUNE=0``: compile only each kernel's first config (no tuning). The GPU test run
#: sets it: correctness does not depend on the tile shape, and tuning every test shape would cost
#: minutes of compilation. Benchmarks and users keep the default (tune).
AUTOTUNE: bool = dispatch.knob("MEDCARE_TRITON_AUTOTUNE") != "0"


def autotune(configs: list[triton.Config], interp: triton.Config, key: list[str], **kw):
    """``triton.autotune`` over ``configs`` on a GPU (only the first with ``MEDCARE_TRITON_AUTOTUNE=0``);
    the single ``interp`` config under the interpreter."""
    chosen = [interp] if INTERPRET else (configs if AUTOTUNE else configs[:1])
    return triton.autotune(configs=chosen, key=key, **kw)


def cfg(num_warps: int = 4, num_stages: int = 2, **meta) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def bucket(n: int) -> int:
    """A coarse size class (powers of two, capped) for autotune keys that must not retune per token count."""
    return min(pow2(n), 8192)


@triton.jit
def mma(a, b, acc):
    """``acc + a @ b`` with float32 accumulation: tensor cores for matching 16-bit operands, IEEE float32
    otherwise (float32 inputs, mixed dtypes, and always under the interpreter)."""
    if _INTERP:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float32 or b.dtype == tl.float32 or a.dtype != b.dtype:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc
