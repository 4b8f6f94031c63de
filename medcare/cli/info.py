"""``medcare info [--json] [--require-cuda]``: what this installation can run: versions of medcare-kernels,
Python, torch (and its CUDA), triton and transformers; the GPU and its compute capability; the compiled CUDA
extension and its architectures; the backends available here, with the reason for each missing one.

The report of :mod:`medcare_kernels.info` (also ``python -m medcare_kernels.info``, ``medcare-kernels-info``).
"""

from __future__ import annotations

from medcare_kernels.info import collect, render

__all__ = ["collect", "main", "render"]


def main(argv: list[str] | None = None) -> int:
    from medcare_kernels.info import main as info_main

    return int(info_main(argv) or 0)
