"""``medcare bench [--quick] [--json FILE] [--plot FILE.png] [...]``: the kernel benchmark table on this
machine's device (the ``python -m benchmarks`` runner, :mod:`medcare_kernels.bench`); every option of that
runner is accepted (``medcare bench --help``)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from medcare_kernels.bench.__main__ import main as bench_main

    return int(bench_main(argv) or 0)
