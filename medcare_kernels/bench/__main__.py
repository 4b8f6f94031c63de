"""``python -m medcare_kernels.bench [--quick] [--json FILE] [--plot FILE.png] [--device D] [--dtype T]``."""

from __future__ import annotations

import argparse

import torch

from medcare_kernels.bench import runner

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m medcare_kernels.bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run of the harness in seconds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="default: float32 on CPU, bfloat16 on a GPU")
    p.add_argument("--formulations", action="store_true",
                   help="also time the torch backend's dense and grouped formulations separately")
    p.add_argument("--methods", default=None, help="comma-separated method names to keep (the floor always runs)")
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG of time relative to the floor here")
    p.add_argument("--tokens", default=None, help="comma-separated token counts to keep (default: the device's list)")
    p.add_argument("--shapes", default=None, help="comma-separated shape names to keep (default: the device's list)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    shapes, tokens = runner.quick_config() if args.quick else runner.default_config(args.device)
    if args.tokens:
        tokens = tuple(int(t) for t in args.tokens.split(","))
    if args.shapes:
        wanted = args.shapes.split(",")
        unknown = sorted(set(wanted) - {s.name for s in shapes})
        if unknown:
            p.error(f"--shapes: unknown {unknown}; known: {[s.name for s in shapes]}")
        shapes = tuple(s for s in shapes if s.name in wanted)
    only = tuple(args.methods.split(",")) if args.methods else None
    rows = runner.run(args.device, dtype, shapes, tokens, args.formulations, not args.no_progress, only,
                      echo=True)
    print(f"\nmachine: {runner.machine()}  device: {args.device}  dtype: {str(dtype).replace('torch.', '')}")
    print(runner.summary(rows))
    print(runner.table(rows))
    if args.json:
        runner.write_json(rows, args.json, args.device, dtype)
    if args.plot:
        runner.plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
