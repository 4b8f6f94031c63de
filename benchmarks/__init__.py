"""Benchmarks: ``python -m benchmarks`` prints the MoLoRA layer table (``--host``: host overhead per op,
``--e2e``: a small Qwen2 training step, ``--roofline``: the GPU launch plan's limits); ``pytest benchmarks``
runs the pytest-benchmark suites. The harness lives in :mod:`medcare_kernels.bench` so ``medcare bench``
can use it."""
