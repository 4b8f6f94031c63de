"""Per-op benchmarks: every backend that can run on the device, for ``route``, ``orthogonal_penalty`` and
the ``molora_linear`` decode path (inference: few tokens, no gradient). These are the numbers that
``backend="auto"``'s per-op choices (``PREFERENCES`` in :mod:`medcare_kernels.dispatch`) rest on.
Each case's backends are timed interleaved (round-robin, in one process); speed-ups are medians of
per-round ratios.

``python -m medcare_kernels.bench.ops [--device cuda] [--dtype bfloat16] [--quick] [--json FILE]``
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

import medcare_kernels as mk
from medcare_kernels.bench import interleave
from medcare_kernels.bench.runner import machine
from medcare_kernels.bench.shapes import GPU_SHAPES, TINY_SHAPES, Shape

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class OpRow:
    op: str
    case: str
    backend: str
    fwd_ms: float
    fwd_bwd_ms: float | None  # None: forward only (decode)
    speedup_fwd: float  # torch backend's time / this backend's
    speedup_fwd_bwd: float | None


def _route_cases(quick: bool):
    return ((1, 8, 2), (64, 8, 2)) if quick else ((1, 8, 2), (64, 8, 2), (4096, 8, 2), (65536, 8, 2), (4096, 64, 8))


def _penalty_cases(quick: bool):
    """(name, [(r_base, r_orth, d) per layer]): the shared LoRA (r_s = 2r = 32) against an orth LoRA of the
    same shape on every FFN linear (gate, up: d = hidden; down: d = intermediate) of a model."""
    if quick:
        return (("tiny-3-layers", [(8, 8, 64), (8, 8, 64), (8, 8, 96)]),)
    return (("qwen2-0.5b-24x3", [(32, 32, d) for _ in range(24) for d in (896, 896, 4864)]),
            ("qwen2-7b-28x3", [(32, 32, d) for _ in range(28) for d in (3584, 3584, 18944)]))


def _decode_cases(quick: bool) -> tuple[tuple[Shape, ...], tuple[int, ...]]:
    return (TINY_SHAPES, (1, 8)) if quick else (GPU_SHAPES, (1, 4, 16, 64))


def _interleaved(fns: dict[str, tuple[Callable[[], object], Callable[[], object] | None]], device: str,
                 quick: bool) -> tuple[dict[str, tuple[float, float | None]], interleave.Timings]:
    """Median ms of every backend's forward (and forward+backward), timed interleaved in one rotation."""
    cands = []
    for b, (fwd, both) in fns.items():
        cands.append(interleave.Candidate(f"{b}/fwd", fwd))
        if both is not None:
            cands.append(interleave.Candidate(f"{b}/fwd+bwd", both))
    t = interleave.measure(cands, rounds=3 if quick else 15, warmup=2, min_sample_s=0.002, device=device)
    res = {b: (t.median(f"{b}/fwd") * 1e3, t.median(f"{b}/fwd+bwd") * 1e3 if both is not None else None)
           for b, (_, both) in fns.items()}
    return res, t


def run(device: str, dtype: torch.dtype, quick: bool = False) -> list[OpRow]:
    backends = [b for b in mk.available_backends(device) if b != "reference"]
    rows: list[OpRow] = []
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*size, scale=1.0, grad=False):
        return (torch.randn(*size, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_(grad)

    def add(op, case, fns):
        results, t = _interleaved(fns, device, quick)
        base = "torch" in results
        for b, (fwd, both) in results.items():
            rows.append(OpRow(op, case, b, fwd, both, t.ratio("torch/fwd", f"{b}/fwd") if base else float("nan"),
                              t.ratio("torch/fwd+bwd", f"{b}/fwd+bwd") if (base and both is not None) else None))

    for T, E, k in _route_cases(quick):
        logits = rand(T, E, scale=2.0, grad=True)
        seed = torch.randn(T, k, generator=g).to(device)
        res = {}
        for b in backends:
            def fwd(b=b, logits=logits, k=k):
                return mk.route(logits, k, backend=b)

            def both(b=b, logits=logits, k=k, seed=seed):
                w, _ = mk.route(logits, k, backend=b)
                return torch.autograd.grad(w, logits, seed)
            res[b] = (fwd, both)
        add("route", f"T={T} E={E} k={k}", res)

    for name, layers in _penalty_cases(quick):
        base = [rand(r1, d, scale=d ** -0.5) for r1, _, d in layers]
        orth = [rand(r2, d, scale=d ** -0.5, grad=True) for _, r2, d in layers]
        res = {}
        for b in backends:
            def fwd(b=b, base=base, orth=orth):
                return mk.orthogonal_penalty(base, orth, backend=b)

            def both(b=b, base=base, orth=orth):
                return torch.autograd.grad(mk.orthogonal_penalty(base, orth, backend=b), orth)
            res[b] = (fwd, both)
        add("orthogonal_penalty", name, res)

    shapes, tokens = _decode_cases(quick)
    for shape in shapes:
        E, r, rs = shape.experts, shape.rank, shape.shared_rank
        weight = rand(shape.d_out, shape.d_in, scale=shape.d_in ** -0.5)
        params = (rand(E, shape.d_in, scale=shape.d_in ** -0.5), rand(E, scale=0.1),
                  rand(E, r, shape.d_in, scale=shape.d_in ** -0.5), rand(E, shape.d_out, r, scale=r ** -0.5),
                  rand(rs, shape.d_in, scale=shape.d_in ** -0.5), rand(shape.d_out, rs, scale=rs ** -0.5))
        for T in tokens:
            x = rand(T, shape.d_in)
            res = {"floor": (lambda x=x, weight=weight: torch.nn.functional.linear(x, weight), None)}
            for b in backends:
                def fwd(b=b, x=x, weight=weight, params=params, shape=shape):
                    with torch.no_grad():
                        return mk.molora_linear(x, weight, None, *params[:4], *params[4:], top_k=shape.top_k,
                                                scaling=2.0, backend=b)
                res[b] = (fwd, None)
            add("molora_linear decode", f"{shape.name} ({shape.d_in}->{shape.d_out}) T={T}", res)
    return rows


def table(rows: list[OpRow]) -> str:
    lines = ["| op | case | backend | fwd ms | fwd+bwd ms | speed-up vs torch (fwd) | speed-up vs torch (fwd+bwd) |",
             "|---|---|---|---|---|---|---|"]

    def f(v, fmt):
        return "-" if v is None or v != v else format(v, fmt)
    for r in rows:
        lines.append(f"| {r.op} | {r.case} | {r.backend} | {f(r.fwd_ms, '.4f')} | {f(r.fwd_bwd_ms, '.4f')} | "
                     f"{f(r.speedup_fwd, '.2f')} | {f(r.speedup_fwd_bwd, '.2f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m medcare_kernels.bench.ops", description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: float32 on CPU, bfloat16 on a GPU")
    p.add_argument("--quick", action="store_true", help="tiny cases: a smoke run in seconds")
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    rows = run(args.device, dtype, args.quick)
    print(f"machine: {machine()}  device: {args.device}  dtype: {str(dtype).replace('torch.', '')}")
    print("each case's backends timed interleaved (round-robin, one process); speed-ups are medians of per-round "
          "ratios")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"kind": "ops", "machine": machine(), "device": args.device,
                       "dtype": str(dtype).replace("torch.", ""), "rows": [asdict(r) for r in rows]}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
