"""The compiled CUDA backend (``backend="cuda"``): the kernels in ``csrc/``, registered as
``torch.ops.medcare_kernels.*_cuda`` by the extension ``medcare_kernels._C``.

What runs compiled, per op (the rest delegates to the torch backend's functions, on the GPU):

=====================  ============================================================================
``route``              forward and backward kernels (one warp per token row)
``orthogonal_penalty`` forward and backward over all layers in one launch per pass, deterministic
``molora_linear``      forward with at most ``DECODE_MAX_TOKENS`` tokens (``dispatch.THRESHOLDS``): the
                       BGMV-style decode kernels (router + shared shrink, route + chosen experts' shrink, expand into
                       the cuBLAS base output). Larger token counts, and every backward (training),
                       use the torch backend on the same saved state (``z``, logits, routing).
``lora_linear``        the torch backend entirely (a GEMM plus two thin GEMMs: nothing to fuse here)
=====================  ============================================================================

float64 inputs (gradcheck) always use the torch backend: the kernels are instantiated for
float32/float16/bfloat16 only.
"""

import torch

#: Element types the kernels are compiled for.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
