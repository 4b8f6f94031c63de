"""Benchmarks: ``python -m benchmarks`` prints the MoLoRA layer table; ``pytest benchmarks`` runs the
pytest-benchmark suites. The harness lives in :mod:`medcare_kernels.bench` so ``medcare bench`` can use it."""
