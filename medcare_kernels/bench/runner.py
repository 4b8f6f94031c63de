"""The benchmark table: every method at every shape and token count, forward and forward+backward."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass

import torch

from medcare_kernels.bench import measure
from medcare_kernels.bench.methods import Inputs, Method, flop_limit, flops, make_inputs, methods
from medcare_kernels.bench.shapes import CPU_SHAPES, CPU_TOKENS, GPU_SHAPES, GPU_TOKENS, QUICK_SHAPES, QUICK_TOKENS, Shape


@dataclass
class Row:
    shape: str
    d_in: int
    d_out: int
    tokens: int
    method: str
    fwd_ms: float
    fwd_bwd_ms: float
    ratio_fwd: float  # to the floor's forward
    ratio_fwd_bwd: float  # to the floor's forward+backward
    tflops_fwd_bwd: float
    peak_mib: float  # forward+backward peak beyond what was live before
    extra_mib: float  # peak beyond the floor's


def _step(method: Method, inp: Inputs, backward: bool):
    targets = [inp.x] if method.is_floor else inp.trainable

    def run():
        y = method.fn(inp)
        if backward:
            torch.autograd.grad(y, targets, inp.grad_y)
        return y
    return run


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def run(device: str = "cpu", dtype: torch.dtype = torch.float32, shapes: tuple[Shape, ...] | None = None,
        tokens: tuple[int, ...] | None = None, formulations: bool = False, progress: bool = True,
        only: tuple[str, ...] | None = None, echo: bool = False) -> list[Row]:
    """Measure every method at every (shape, tokens); ratios are to the floor at the same point.
    ``echo``: print each row as it is measured (a run cut short still leaves its numbers)."""
    gpu = device.startswith("cuda")
    shapes = shapes or (GPU_SHAPES if gpu else CPU_SHAPES)
    tokens = tokens or (GPU_TOKENS if gpu else CPU_TOKENS)
    todo = [m for m in methods(device, formulations) if only is None or m.is_floor or m.name in only]
    points = [(s, t) for s in shapes for t in tokens]
    rows: list[Row] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(points) * len(todo), desc="benchmarks", unit="run")
    for shape, t in points:
        inp = make_inputs(shape, t, dtype, device)
        base = None
        for m in todo:
            with m.environment():
                fwd = measure.median_time_ms(_step(m, inp, False), device)
                both = measure.median_time_ms(_step(m, inp, True), device)
                peak = measure.peak_bytes(_step(m, inp, True), device) / 2**20
            if m.is_floor:
                base = (fwd, both, peak)
            rows.append(Row(shape.name, shape.d_in, shape.d_out, t, m.name, fwd, both, fwd / base[0],
                            both / base[1], flops(shape, t, m, True) / both / 1e9, peak, peak - base[2]))
            if echo:
                line = row_line(rows[-1])
                bar.write(line) if bar is not None else print(line, flush=True)
            if bar is not None:
                bar.update()
        del inp
    if bar is not None:
        bar.close()
    return rows


def table(rows: list[Row]) -> str:
    """A markdown table of the rows."""
    head = ("| shape | T | method | fwd ms | fwd+bwd ms | x floor (fwd) | x floor (fwd+bwd) | TFLOP/s "
            "| peak MiB | beyond floor MiB |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r.shape} ({r.d_in}->{r.d_out}) | {r.tokens} | {r.method} | {r.fwd_ms:.3f} | "
                     f"{r.fwd_bwd_ms:.3f} | {r.ratio_fwd:.2f} | {r.ratio_fwd_bwd:.2f} | {r.tflops_fwd_bwd:.3f} | "
                     f"{r.peak_mib:.1f} | {r.extra_mib:.1f} |")
    return "\n".join(lines)


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
    return (f"{r.shape} T={r.tokens} {r.method}: fwd {r.fwd_ms:.3f} ms ({r.ratio_fwd:.2f}x), fwd+bwd "
            f"{r.fwd_bwd_ms:.3f} ms ({r.ratio_fwd_bwd:.2f}x), {r.tflops_fwd_bwd:.1f} TFLOP/s, "
            f"+{r.extra_mib:.1f} MiB")


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
            out.append(f"{shape} T={t} {name}: {r.ratio_fwd_bwd:.3f}x floor, {ref.fwd_bwd_ms / r.fwd_bwd_ms:.1f}x "
                       f"faster than reference, extra memory {100 * mem:.1f}% of the reference's")
    return out
