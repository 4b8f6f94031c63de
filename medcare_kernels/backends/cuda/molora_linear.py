"""``molora_linear`` for the cuda backend: the decode kernels for few tokens, the torch backend otherwise.

Forward with ``T <= DECODE_MAX_TOKENS`` tokens runs ``molora_decode_cuda``: the base linear through
cuBLAS, then three kernels working per token on the chosen experts only (no sort, no segment GEMMs, no
host synchronisation). Larger forwards, and every backward, run the torch backend's functions: the
decode kernels save the same state (``z`` in slot order, logits, weights, indices), so a decode forward
can be differentiated like any other.
"""

from __future__ import annotations

import torch

from medcare_kernels.backends.cuda import KERNEL_DTYPES
from medcare_kernels.backends.pytorch import molora_linear as _torch
from medcare_kernels.dispatch import THRESHOLDS

_ops = torch.ops.medcare_kernels

#: The decode kernels keep ``k*r + r_s`` floats and ``2k`` routing values per token in shared memory.
_SHARED_FLOATS = 48 * 1024 // 4

backward = _torch.backward


def decode_applies(x, lora_A, shared_A, router_weight, top_k: int) -> bool:
    """Whether a forward of these inputs runs the decode kernels."""
    r = lora_A.shape[1]
    r_s = 0 if shared_A is None else shared_A.shape[0]
    dtypes = {x.dtype, lora_A.dtype, router_weight.dtype}
    return (x.shape[0] <= THRESHOLDS["DECODE_MAX_TOKENS"].value and dtypes <= set(KERNEL_DTYPES)
            and top_k * r + r_s + 2 * top_k <= _SHARED_FLOATS)


def forward(x, weight, bias, router_weight, router_bias, lora_A, lora_B, shared_A, shared_B, lora_x,
            top_k: int, scaling: float):
    if not decode_applies(x, lora_A, shared_A, router_weight, top_k):
        return _torch.forward(x, weight, bias, router_weight, router_bias, lora_A, lora_B, shared_A, shared_B,
                              lora_x, top_k, scaling)
    # The kernels read the router and every LoRA tensor in one element type: x's or float32. Other
    # combinations are upcast to float32, which is exact.
    p = lora_A.dtype if (router_weight.dtype == lora_A.dtype and lora_A.dtype in (x.dtype, torch.float32)) \
        else torch.float32

    def prep(t):
        return None if t is None else t.to(p).contiguous()
    out = _ops.molora_decode_cuda(x, weight, bias, prep(router_weight), prep(router_bias), prep(lora_A),
                                  prep(lora_B), prep(shared_A), prep(shared_B), lora_x, top_k, float(scaling))
    return tuple(out)
