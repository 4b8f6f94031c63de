"""``python -m medcare_kernels.bench.report FILE.json ...``: benchmark JSON files (from ``python -m benchmarks
--json`` or ``python -m medcare_kernels.bench.ops --json``) as markdown tables, with the machine named.
Missing files are noted and skipped."""

from __future__ import annotations

import json
import os
import sys

from medcare_kernels.bench.ops import OpRow
from medcare_kernels.bench.ops import table as ops_table
from medcare_kernels.bench.runner import Row
from medcare_kernels.bench.runner import table as layer_table


def render(path: str) -> str:
    if not os.path.exists(path):
        return f"_{path}: not produced (see the logs)_\n"
    with open(path) as fh:
        data = json.load(fh)
    if data.get("kind") == "ops":
        title, body = "Per-op benchmark", ops_table([OpRow(**r) for r in data["rows"]])
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
