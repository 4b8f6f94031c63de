"""``python -m medcare_kernels.bench.report FILE.json ...``: benchmark JSON files (from ``python -m benchmarks
[--host | --e2e] --json`` or ``python -m medcare_kernels.bench.ops --json``) as markdown tables, with the machine named.
Missing files are noted and skipped."""

from __future__ import annotations

import json
import os
import sys

import torch

from medcare_kernels.bench.ops import OpRow
from medcare_kernels.bench.ops import table as ops_table
from medcare_kernels.bench.runner import Row
from medcare_kernels.bench.runner import table as layer_table


def render(path: str) -> str:
    if not os.path.exists(path):
        return f"_{path}: not produced (see the logs)_\n"
    with open(path) as fh:
        data = json.load(fh)
    kind = data.get("kind")
    if kind == "ops":
        title, body = "Per-op benchmark", ops_table([OpRow(**r) for r in data["rows"]])
    elif kind == "host":
        from medcare_kernels.bench import host

        title, body = "Host overhead", f"{host.HEADER}\n\n{host.table([host.HostRow(**r) for r in data['rows']])}"
    elif kind == "e2e":
        from medcare_kernels.bench import e2e

        size = e2e.ModelSize(**data["size"])
        head = e2e.header(size, data["device"], getattr(torch, data["dtype"]), data["rounds"],
                          data["warmup"])
        title, body = "End to end", f"{head}\n\n{e2e.table([e2e.E2ERow(**r) for r in data['rows']])}"
    else:
        title, body = "MoLoRA layer benchmark", layer_table([Row(**r) for r in data["rows"]])
    return (f"## {title}\n\nmachine: {data['machine']}; device: {data['device']}; dtype: {data['dtype']} "
            f"(`{os.path.basename(path)}`)\n\n{body}\n")


def main(argv: list[str] | None = None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    print("\n".join(render(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
