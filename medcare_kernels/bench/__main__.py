"""``python -m benchmarks`` (= ``python -m medcare_kernels.bench``, ``medcare bench``): one table per run.

* default: the MoLoRA layer table (every method against the frozen linear; on a GPU with the roofline
  column of the method's launch plan);
* ``--host``: host overhead of one call of each public op and backend at tiny shapes, against
  ``F.linear`` and a plain-autograd LoRA, with the aten ops per call;
* ``--e2e``: one stage-1 training step of a small Qwen2: frozen, plain LoRA, MedCare stage 1, the
  authors' dense MoLoRA;
* ``--roofline``: the roofline predictions for Qwen2-7B up/down at T = 4096 and 16384 (no timing, no GPU).

Every timed table is measured interleaved (each candidate once per round, round-robin, in one process);
ratios are medians of per-round ratios. ``--quick`` makes any table small enough for seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import torch

from medcare_kernels.bench import runner

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--host", action="store_true", help="the host-overhead table (tiny shapes, every op and backend)")
    mode.add_argument("--e2e", action="store_true", help="the end-to-end table (a small Qwen2 stage-1 training step)")
    mode.add_argument("--roofline", action="store_true",
                      help="print the roofline predictions for the GPU rows and exit")
    p.add_argument("--quick", action="store_true", help="small shapes / a tiny model: a smoke run in seconds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="default: float32 on CPU; bfloat16 on a GPU for the layer and end-to-end tables, float32 "
                        "for --host")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default per table)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls or steps per candidate (default per table)")
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    p.add_argument("--no-progress", action="store_true")
    layer = p.add_argument_group("layer table")
    layer.add_argument("--formulations", action="store_true",
                       help="also time the torch backend's dense and grouped formulations separately")
    layer.add_argument("--methods", default=None,
                       help="comma-separated method names to keep (the floor always runs; name triton to time it "
                            "under the CPU interpreter)")
    layer.add_argument("--plot", default=None, help="write a PNG of time relative to the floor here")
    layer.add_argument("--tokens", default=None, help="comma-separated token counts (default: the device's list)")
    layer.add_argument("--shapes", default=None,
                       help="comma-separated shape names to keep (default: the device's list)")
    layer.add_argument("--roofline-device", default=None,
                       help="GPU for the roofline column and --roofline's launch list: h200, h100, a100 "
                            "(default: this GPU)")
    host = p.add_argument_group("--host")
    host.add_argument("--backends", default=None,
                      help="comma-separated backends (default: every available one; name triton to time the CPU "
                           "interpreter)")
    e2e = p.add_argument_group("--e2e (defaults: Qwen2-0.5B widths, 2 layers, vocabulary 2048, batch 4 x 256)")
    for name, default in (("layers", 2), ("hidden", 896), ("intermediate", 4864), ("heads", 14), ("kv-heads", 2),
                          ("vocab", 2048), ("batch", 4), ("seq", 256)):
        e2e.add_argument(f"--{name}", type=int, default=None, help=f"default {default}")
    e2e.add_argument("--e2e-methods", default=None,
                     help="comma-separated: frozen, 'plain LoRA (PEFT)', 'plain LoRA (medcare)', 'medcare stage 1', "
                          "\"authors' dense MoLoRA\" (frozen always runs)")
    return p


def _write(path: str | None, kind: str, device: str, dtype: torch.dtype, rows: list[dict], **extra) -> None:
    if not path:
        return
    payload = {"kind": kind, "machine": runner.machine(), "device": device, "dtype": str(dtype).replace("torch.", ""),
               "rows": rows, **extra}
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=1)


def _layer(args, p: argparse.ArgumentParser, dtype: torch.dtype) -> int:
    shapes, tokens = runner.quick_config() if args.quick else runner.default_config(args.device)
    if args.tokens:
        tokens = tuple(int(t) for t in args.tokens.split(","))
    if args.shapes:
        wanted = args.shapes.split(",")
        unknown = sorted(set(wanted) - {s.name for s in shapes})
        if unknown:
            p.error(f"--shapes: unknown {unknown}; known: {[s.name for s in shapes]}")
        shapes = tuple(s for s in shapes if s.name in wanted)
    base = runner.QUICK_TIMING if args.quick else runner.DEFAULT_TIMING
    timing = runner.Timing(args.rounds or base.rounds, args.warmup or base.warmup, base.min_sample_s)
    only = tuple(args.methods.split(",")) if args.methods else None
    rows = runner.run(args.device, dtype, shapes, tokens, args.formulations, not args.no_progress, only,
                      echo=True, timing=timing, roofline_device=args.roofline_device)
    print(f"\nmachine: {runner.machine()}  device: {args.device}  dtype: {str(dtype).replace('torch.', '')}  "
          f"rounds: {timing.rounds}")
    for line in runner.caveats(rows):
        print(f"NOTE: {line}")
    print(runner.summary(rows))
    print(runner.table(rows))
    if args.json:
        runner.write_json(rows, args.json, args.device, dtype)
    if args.plot:
        runner.plot(rows, args.plot)
    return 0


def _host(args, dtype: torch.dtype) -> int:
    from medcare_kernels.bench import host

    rounds = args.rounds or (5 if args.quick else 25)
    warmup = args.warmup or 3
    include = tuple(args.backends.split(",")) if args.backends else None
    rows = host.run(args.device, dtype, rounds=rounds, warmup=warmup, min_sample_s=0.001 if args.quick else 0.002,
                    include=include)
    print(f"machine: {runner.machine()}  device: {args.device}  dtype: {str(dtype).replace('torch.', '')}  "
          f"rounds: {rounds}")
    print(host.HEADER)
    print("\n".join(host.targets(rows)))
    print(host.table(rows))
    _write(args.json, "host", args.device, dtype, [asdict(r) for r in rows], rounds=rounds)
    return 0


def _e2e(args, dtype: torch.dtype) -> int:
    from medcare_kernels.bench import e2e

    quick = e2e.ModelSize(layers=1, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=128, batch=2, seq=16)
    base = quick if args.quick else e2e.ModelSize()
    size = e2e.ModelSize(*(getattr(args, f) if getattr(args, f) is not None else getattr(base, f)
                           for f in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "batch", "seq")))
    rounds = args.rounds or (2 if args.quick else 5)
    warmup = args.warmup or (1 if args.quick else 2)
    wanted = tuple(m.strip() for m in args.e2e_methods.split(",")) if args.e2e_methods else None
    progress = None if args.no_progress else (lambda s: print(s, file=sys.stderr, flush=True))
    rows = e2e.run(size, args.device, dtype, rounds=rounds, warmup=warmup, wanted=wanted, progress=progress)
    print(f"machine: {runner.machine()}  device: {args.device}")
    print(e2e.header(size, args.device, dtype, rounds, warmup))
    if not e2e.peft_available():
        print("NOTE: peft is not installed: the plain LoRA is this library's LoRALinear (pip install peft for PEFT's)")
    print("\n".join(e2e.targets(rows)))
    print(e2e.table(rows))
    _write(args.json, "e2e", args.device, dtype, e2e.to_json(rows), size=asdict(size), rounds=rounds, warmup=warmup)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    for name in ("rounds", "warmup", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name} must be >= 1, got {v}")
    threads = torch.get_num_threads()
    try:  # the thread count is process-wide: restored for callers that run main() in their process
        return _main(args, p)
    finally:
        torch.set_num_threads(threads)


def _main(args, p: argparse.ArgumentParser) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.quick and not args.device.startswith("cuda") and not args.roofline:
        # Tiny shapes: a second thread adds only OpenMP synchronisation, which a busy machine turns into
        # milliseconds per op (measured: a [4, 8] softmax 2 ms with 2 threads under load, 14-45 us with 1).
        torch.set_num_threads(1)
        print("NOTE: --quick on the CPU runs on 1 thread (--threads N to change it): at these sizes more threads "
              "only add synchronisation", file=sys.stderr)
    if args.roofline:
        from medcare_kernels.bench import roofline

        dev = (args.roofline_device or "h200").lower()
        if dev not in roofline.DEVICES:
            p.error(f"--roofline-device: unknown {dev!r}; known: {sorted(roofline.DEVICES)}")
        print(roofline.report(dev))
        return 0
    if args.roofline_device and runner.roofline.device_for(args.roofline_device) is None:
        p.error(f"--roofline-device: unknown {args.roofline_device!r}; known: {sorted(runner.roofline.DEVICES)}")
    gpu = args.device.startswith("cuda")
    if args.dtype:
        dtype = _DTYPES[args.dtype]
    else:
        dtype = torch.bfloat16 if gpu and not args.host else torch.float32
    if args.host:
        return _host(args, dtype)
    if args.e2e:
        return _e2e(args, dtype)
    return _layer(args, p, dtype)


if __name__ == "__main__":
    raise SystemExit(main())
