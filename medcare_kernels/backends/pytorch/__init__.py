"""The portable PyTorch backend (``backend="torch"``): CPU and CUDA, the CPU default.

One module per op, each with ``forward`` and ``backward`` (the contract in :mod:`medcare_kernels.ops`).
"""
