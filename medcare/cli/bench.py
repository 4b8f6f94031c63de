"""``medcare bench [--quick] [--host | --e2e | --roofline] [--json FILE] [--plot FILE.png] [...]``: the
benchmark tables on this machine's device (the ``python -m benchmarks`` runner, :mod:`medcare_kernels.bench`):
the MoLoRA layer table by default, the host-overhead, end-to-end or roofline table on request; every
option of that runner is accepted (``medcare bench --help``). Timed tables are measured interleaved and
flag rows whose numbers are not a statement about speed (``--quick``'s host-bound points say so)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from medcare_kernels.bench.__main__ import main as bench_main

    return int(bench_main(argv) or 0)
