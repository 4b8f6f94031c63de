"""The Triton backend (``backend="triton"``): fused kernels for the four ops, CUDA GPUs (and the CPU under
``TRITON_INTERPRET=1``, slowly, for tests).

One module per op (``route``, ``molora_linear``, ``lora_linear``, ``orthogonal_penalty``), each with
``forward`` and ``backward`` per the backend contract in :mod:`medcare_kernels.ops`; the kernels they
share live in ``shrink`` (thin GEMM + routing epilogues), ``gemm`` (K-extended GEMM, token reductions)
and ``grouped`` (expert-sorted segments). The registry imports these modules lazily: importing
:mod:`medcare_kernels` never imports triton.

Dtypes: float16, bfloat16 and float32 (float32 dots use IEEE precision, not TF32); float64 raises a
``TypeError`` (use ``backend="torch"``).
"""
