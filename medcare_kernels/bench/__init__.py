"""Kernel benchmarks: MoLoRA linear against the frozen linear (the floor), the authors' dense method
(``reference``), a per-expert Python loop, and this library's backends.

Run ``python -m benchmarks`` (from the repository) or ``python -m medcare_kernels.bench``.
"""
