"""The benchmark table: every method at every shape and token count, forward and forward+backward,
timed interleaved (every method and direction of a point once per round, rotated, medians of per-round
ratios), with sanity flags per row and, on a GPU, the roofline time of the method's launch plan."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field

import torch

from medcare_kernels.bench import interleave, measure, roofline, sanity
from medcare_kernels.bench.methods import Inputs, Method, flop_limit, flops, make_inputs, methods
from medcare_kernels.bench.shapes import (
    CPU_SHAPES,
    CPU_TOKENS,
    GPU_SHAPES,
    GPU_TOKENS,
    QUICK_SHAPES,
    QUICK_TOKENS,
    Shape,
)


@dataclass
class Row:
    shape: str
    d_in: int
    d_out: int
    tokens: int
    method: str
    fwd_ms: float
    fwd_bwd_ms: float
    ratio_fwd: float  # to the floor's forward (median of per-round ratios)
    ratio_fwd_bwd: float  # to the floor's forward+backward (median of per-round ratios)
    tflops_fwd_bwd: float
    peak_mib: float  # forward+backward peak beyond what was live before
    extra_mib: float  # peak beyond the floor's
    flags: list[str] = field(default_factory=list)  # sanity warnings (medcare_kernels.bench.sanity)
    roofline_ms: float | None = None  # fwd+bwd time the launch plan allows on the device (GPU rows)
    spread: float = 0.0  # relative IQR of the per-round fwd+bwd ratio to the floor


@dataclass(frozen=True)
class Timing:
    """How a point is timed: interleaved rounds (see :mod:`medcare_kernels.bench.interleave`)."""

    rounds: int = 7
    warmup: int = 2
    min_sample_s: float = 0.0  # calls per sample calibrated so one sample lasts at least this


#: --quick: enough rounds, and calls per sample, that the small points resolve (a 7 us floor x 700 calls).
QUICK_TIMING = Timing(rounds=9, warmup=3, min_sample_s=0.005)
DEFAULT_TIMING = Timing(rounds=7, warmup=2, min_sample_s=0.002)


def _step(method: Method, inp: Inputs, backward: bool):
    targets = [inp.x] if method.is_floor else inp.trainable

    def run():
        y = method.fn(inp)
        if backward:
            torch.autograd.grad(y, targets, inp.grad_y)
        return y
    return run


#: The 1-minute load average when the harness was imported (the start of a run): what the run competed with.
START_LOAD = os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def machine() -> str:
    """The device, torch version and, on the CPU, the threads and the load when the run started (other
    processes on a small machine move every CPU time)."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    load = f", load average {START_LOAD:.1f} at the start" if START_LOAD is not None else ""
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads "
            f"(torch {torch.__version__}){load}")


def interpreted(method: Method, device: str) -> bool:
    """Whether ``method`` runs Triton kernels in the interpreter (CPU, ``TRITON_INTERPRET=1``): not a speed."""
    return (method.name.startswith("triton") and torch.device(device).type == "cpu"
            and os.environ.get("TRITON_INTERPRET") == "1")


def select(device: str, formulations: bool = False, only: tuple[str, ...] | None = None) -> list[Method]:
    """The methods to time: the floor always; the others named in ``only`` (all when None), except Triton
    under the CPU interpreter unless ``only`` names it."""
    out = []
    for m in methods(device, formulations):
        if m.is_floor:
            out.append(m)
        elif only is not None:
            if m.name in only:
                out.append(m)
        elif not interpreted(m, device):
            out.append(m)
    return out


def roofline_ms(method: str, shape: Shape, tokens: int, dtype: torch.dtype, device_name: str | None) -> float | None:
    """Forward+backward time the method's launch plan allows on the named GPU (None: no plan or device)."""
    dev = roofline.device_for(device_name)
    plan = roofline.plan_for(method, tokens)
    if dev is None or plan is None:
        return None
    size = torch.empty((), dtype=dtype).element_size()
    p = roofline.Point(shape.d_in, shape.d_out, tokens, shape.experts, shape.rank, shape.top_k, shape.shared_rank,
                       size)
    return roofline.predict_s(plan, p, dev) * 1e3


def run(device: str = "cpu", dtype: torch.dtype = torch.float32, shapes: tuple[Shape, ...] | None = None,
        tokens: tuple[int, ...] | None = None, formulations: bool = False, progress: bool = True,
        only: tuple[str, ...] | None = None, echo: bool = False, timing: Timing = DEFAULT_TIMING,
        roofline_device: str | None = None) -> list[Row]:
    """Measure every method at every (shape, tokens), forward and forward+backward, interleaved round by
    round (all methods and both directions of a point in one rotation); ratios are to the floor at the
    same point, medians of per-round ratios. ``echo``: print each point's rows as they are measured (a
    run cut short still leaves its numbers). ``roofline_device``: name of the GPU for the roofline column
    (default: this GPU's name on CUDA; none on the CPU)."""
    gpu = device.startswith("cuda")
    shapes = shapes or (GPU_SHAPES if gpu else CPU_SHAPES)
    tokens = tokens or (GPU_TOKENS if gpu else CPU_TOKENS)
    todo = select(device, formulations, only)
    if roofline_device is None and gpu:
        roofline_device = torch.cuda.get_device_name()
    points = [(s, t) for s in shapes for t in tokens]
    resolution = sanity.timer_resolution(interleave.device_clock(device))
    rows: list[Row] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(points), desc="benchmarks", unit="point")
    for shape, t in points:
        inp = make_inputs(shape, t, dtype, device)
        cands = []
        for m in todo:
            for backward in (False, True):
                cands.append(interleave.Candidate(f"{m.name}/{'fwd+bwd' if backward else 'fwd'}",
                                                  _step(m, inp, backward), m.environment))
        tm = interleave.measure(cands, rounds=timing.rounds, warmup=timing.warmup, min_sample_s=timing.min_sample_s,
                                device=device)
        peaks = {}
        for m in todo:
            with m.environment():
                peaks[m.name] = measure.peak_bytes(_step(m, inp, True), device) / 2**20
        floor = next(m.name for m in todo if m.is_floor)
        point_rows = []
        for m in todo:
            fwd, both = tm.median(f"{m.name}/fwd"), tm.median(f"{m.name}/fwd+bwd")
            spread = tm.spread(f"{m.name}/fwd+bwd", f"{floor}/fwd+bwd")
            flags = sanity.row_flags(fwd_s=fwd, fwd_bwd_s=both, floor_call_s=tm.median(f"{floor}/fwd"),
                                     floor_sample_s=tm.sample_s(f"{floor}/fwd"), resolution_s=resolution,
                                     spread=spread, interpreted=interpreted(m, device))
            point_rows.append(Row(shape.name, shape.d_in, shape.d_out, t, m.name, fwd * 1e3, both * 1e3,
                                  tm.ratio(f"{m.name}/fwd", f"{floor}/fwd"),
                                  tm.ratio(f"{m.name}/fwd+bwd", f"{floor}/fwd+bwd"),
                                  flops(shape, t, m, True) / both / 1e12, peaks[m.name],
                                  peaks[m.name] - peaks[floor], flags,
                                  roofline_ms(m.name, shape, t, dtype, roofline_device), spread))
        rows += point_rows
        if echo:
            for r in point_rows:
                line = row_line(r)
                bar.write(line) if bar is not None else print(line, flush=True)
        if bar is not None:
            bar.update()
        del inp
    if bar is not None:
        bar.close()
    return rows


def table(rows: list[Row]) -> str:
    """A markdown table of the rows; the roofline columns when any row has one, the flags when any row does."""
    roof = any(r.roofline_ms is not None for r in rows)
    flagged = any(r.flags for r in rows)
    head = ("| shape | T | method | fwd ms | fwd+bwd ms | x floor (fwd) | x floor (fwd+bwd) | TFLOP/s "
            "| peak MiB | beyond floor MiB |")
    cols = 10
    if roof:
        head += " roofline fwd+bwd ms | x roofline |"
        cols += 2
    if flagged:
        head += " flags |"
        cols += 1
    lines = [head, "|" + "---|" * cols]
    for r in rows:
        line = (f"| {r.shape} ({r.d_in}->{r.d_out}) | {r.tokens} | {r.method} | {r.fwd_ms:.3f} | "
                f"{r.fwd_bwd_ms:.3f} | {r.ratio_fwd:.2f} | {r.ratio_fwd_bwd:.2f} | {r.tflops_fwd_bwd:.3f} | "
                f"{r.peak_mib:.1f} | {r.extra_mib:.1f} |")
        if roof:
            line += (f" {r.roofline_ms:.3f} | {r.fwd_bwd_ms / r.roofline_ms:.2f} |" if r.roofline_ms
                     else " - | - |")
        if flagged:
            line += f" {'; '.join(r.flags) or '-'} |"
        lines.append(line)
    return "\n".join(lines)


def caveats(rows: list[Row]) -> list[str]:
    """What a reader must know before reading the table: how it was timed, and the flagged rows."""
    out = ["ratios are medians of per-round ratios, measured interleaved (every method and direction of a point "
           "timed once per round, rotated, in one process)"]
    bad = [r for r in rows if not sanity.is_meaningful(r.flags)]
    if bad:
        out.append(f"{len(bad)} of {len(rows)} rows are NOT a statement about speed (see their flags): "
                   + ", ".join(f"{r.shape} T={r.tokens} {r.method}" for r in bad))
    host = sorted({(r.shape, r.tokens) for r in rows if any(f.startswith("host-bound") for f in r.flags)})
    if host:
        out.append("host-bound points (the floor takes < 50 us/call): every time there is per-call overhead "
                   "(Python, dispatch, launches), not arithmetic: " + ", ".join(f"{s} T={t}" for s, t in host))
    noisy = [r for r in rows if any(f.startswith("noisy") for f in r.flags)]
    if noisy:
        out.append(f"{len(noisy)} rows moved more than {100 * sanity.NOISY_SPREAD:.0f}% between rounds (machine "
                   "load): rerun with more rounds or on a quiet machine before quoting them")
    return out


def write_json(rows: list[Row], path: str, device: str, dtype: torch.dtype) -> None:
    payload = {"machine": machine(), "device": device, "dtype": str(dtype).replace("torch.", ""),
               "rows": [asdict(r) for r in rows]}
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def plot(rows: list[Row], path: str) -> None:
    """Forward+backward time relative to the floor, one panel per shape (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r.shape for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        sub = [r for r in rows if r.shape == shape]
        for method in dict.fromkeys(r.method for r in sub):
            pts = [(r.tokens, r.ratio_fwd_bwd) for r in sub if r.method == method]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel("forward+backward time / frozen linear")
        ax.set_title(shape)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def quick_config() -> tuple[tuple[Shape, ...], tuple[int, ...]]:
    return QUICK_SHAPES, QUICK_TOKENS


def default_config(device: str) -> tuple[tuple[Shape, ...], tuple[int, ...]]:
    """The table's shapes and token counts for ``device`` (GPU: Qwen2-7B bf16; CPU: Qwen2-0.5B/1.5B)."""
    return (GPU_SHAPES, GPU_TOKENS) if device.startswith("cuda") else (CPU_SHAPES, CPU_TOKENS)


def row_line(r: Row) -> str:
    """One measured row as a line of text (what ``echo`` prints while the table is being measured)."""
    roof = f", roofline {r.roofline_ms:.3f} ms" if r.roofline_ms else ""
    flags = f"  [{'; '.join(r.flags)}]" if r.flags else ""
    return (f"{r.shape} T={r.tokens} {r.method}: fwd {r.fwd_ms:.3f} ms ({r.ratio_fwd:.2f}x), fwd+bwd "
            f"{r.fwd_bwd_ms:.3f} ms ({r.ratio_fwd_bwd:.2f}x), {r.tflops_fwd_bwd:.1f} TFLOP/s, "
            f"+{r.extra_mib:.1f} MiB{roof}{flags}")


def summary(rows: list[Row]) -> str:
    limits = {}
    for s in (*CPU_SHAPES, *GPU_SHAPES, *QUICK_SHAPES):
        limits[s.name] = flop_limit(s)
    lines = []
    for shape in dict.fromkeys(r.shape for r in rows):
        if shape in limits:
            lines.append(f"{shape}: FLOP limit of a MoLoRA layer = {limits[shape]:.3f}x the frozen linear")
    lines += targets(rows)
    return "\n".join(lines)


def targets(rows: list[Row]) -> list[str]:
    """Per fused method and point: forward+backward vs the floor, speed-up over the reference, and the
    activation memory beyond the floor as a share of the reference's (issue targets on an H100 at
    T=16384: <= 1.10x the floor, >= 3x faster than the reference, <= 2% of its extra memory)."""
    out = []
    for (shape, t) in dict.fromkeys((r.shape, r.tokens) for r in rows):
        point = {r.method: r for r in rows if r.shape == shape and r.tokens == t}
        ref = point.get("reference")
        if ref is None:
            continue
        for name, r in point.items():
            if not name.startswith(("triton", "cuda")):
                continue
            mem = r.extra_mib / ref.extra_mib if ref.extra_mib > 0 else float("nan")
            caveat = "" if sanity.is_meaningful(r.flags) else " (not a speed: see the row's flags)"
            out.append(f"{shape} T={t} {name}: {r.ratio_fwd_bwd:.3f}x floor, {ref.fwd_bwd_ms / r.fwd_bwd_ms:.1f}x "
                       f"faster than reference, extra memory {100 * mem:.1f}% of the reference's{caveat}")
    return out
