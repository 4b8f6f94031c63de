"""Roofline of a MoLoRA linear's GPU launch plan: the time its bytes and FLOPs allow on a named device.

The launch plans are DATA: per path, a list of :class:`Launch` (phase, name, bytes and FLOPs as
functions of a :class:`Point`: ``d_in, d_out, T, E, r, k, r_s``, the element size of x/W/y and the
device's SM count). A launch's time is ``max(bytes / HBM bandwidth, FLOPs / matmul rate)``; a path's
time is the sum over its launches (launches do not overlap; fixed launch latency is not included, the
plan's launch count is printed beside it). Read every GPU number of the layer table against it.

**Keep in step with the code.** ``PLANS["triton-dense-cublas"]`` describes the Triton backend's dense
MoLoRA path with the cuBLAS base (``MEDCARE_TRITON_BASE=cublas``; what ``auto`` runs from 1024 tokens)
as read from the code: cuBLAS dA/dB, a token block that fills the SMs at prefill (no split-K reduce),
dx's router term from dZ's 16-bit d_logits, no zero-filled gradients on the eager path.
``PLANS["triton-dense-cublas-before"]`` is the path the H200 last measured (benchmarks/RESULTS.md),
before those changes, kept so the two read side by side. Each plan reflects the launchers
``shrink_forward`` / ``shrink_backward``
(token block and split-K rules: :func:`block_t`, :func:`split_k`), ``ext_gemm`` and ``token_reduce``, and
the padded rank-space widths of their ``Layout`` (:class:`Point` ``.W``, ``.WZ``, ``.WS``, ``.EL``). When a
launch changes (cuBLAS for dA/dB, no split-K reduce at prefill, dx's router term from the 16-bit
d_logits, no materialised zero gradients, ...), edit its entry here, or add a new plan and point
``METHOD_PLANS`` at it; ``tests/test_bench_roofline.py`` pins the totals of today's plan to the analysis
it came from, so a change shows up as a deliberate test update.

``python -m benchmarks --roofline`` prints the predictions for Qwen2-7B up/down at T = 4096 and 16384 on
every device of :data:`DEVICES` (no GPU needed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from medcare_kernels.bench.shapes import GPU_SHAPES


def pow2(n: int, floor: int = 1) -> int:
    """The smallest power of two >= max(n, floor)."""
    n = max(int(n), int(floor), 1)
    return 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def roundup(n: int, m: int) -> int:
    return cdiv(n, m) * m


@dataclass(frozen=True)
class Device:
    name: str
    hbm_bytes_s: float  # HBM bandwidth
    mm_flop_s: float  # dense 16-bit matmul rate cuBLAS reaches on these shapes
    sms: int
    source: str  # where the numbers come from


#: Key -> device. Match a CUDA device name with :func:`device_for`.
DEVICES = {
    "h200": Device("NVIDIA H200", 4.8e12, 700e12, 132,
                   "HBM3e 4.8 TB/s: NVIDIA H200 datasheet; 700 TFLOP/s: bf16 cuBLAS measured on an H200 on the "
                   "Qwen2-7B FFN shapes at T=16384 (benchmarks/RESULTS.md, the floor rows: 700-711 TFLOP/s)"),
    "h100": Device("NVIDIA H100 SXM", 3.35e12, 700e12, 132,
                   "HBM3 3.35 TB/s: NVIDIA H100 SXM5 datasheet; ~700 TFLOP/s assumed equal to the H200's measured "
                   "rate (same GH100 compute, 989 TFLOP/s dense bf16 peak); not measured"),
    "a100": Device("NVIDIA A100 SXM 80GB", 2.0e12, 280e12, 108,
                   "HBM2e 2.0 TB/s (2,039 GB/s): NVIDIA A100 80GB SXM datasheet; ~280 TFLOP/s: about 90% of the "
                   "312 TFLOP/s dense bf16 peak, what cuBLAS typically reaches on large GEMMs; not measured"),
}


def device_for(name: str | None) -> Device | None:
    """The :data:`DEVICES` entry whose key appears in ``name`` (e.g. ``"NVIDIA H200"`` -> h200), or None."""
    if not name:
        return None
    low = name.lower()
    if low in DEVICES:
        return DEVICES[low]
    for key, dev in DEVICES.items():
        if key in low.replace(" ", ""):
            return dev
    return None


@dataclass(frozen=True)
class Point:
    """One MoLoRA linear call: shapes, experts, element size (2: bf16) and the device's SM count."""

    d_in: int
    d_out: int
    T: int
    E: int = 8
    r: int = 16
    k: int = 2
    r_s: int = 32
    size: int = 2
    sms: int = 132

    # -- the Triton path's padded rank-space widths (its shrink ``Layout``; keep in step) --
    @property
    def E_R(self) -> int:
        return pow2(self.E)

    @property
    def R_PAD(self) -> int:
        return pow2(self.r, 16 // self.E_R if self.E_R < 16 else 1)

    @property
    def RS_PAD(self) -> int:
        return pow2(self.r_s, 16)

    @property
    def W(self) -> int:
        """Width of H and B_cat = [B_all | B_s] (160 at E=8, r=16, r_s=32)."""
        return self.E_R * self.R_PAD + (self.RS_PAD if self.r_s else 0)

    @property
    def EL(self) -> int:
        return pow2(self.E, 16)

    @property
    def WZ(self) -> int:
        """Width of dZ: H's columns, then the router's d_logits (176)."""
        return self.W + self.EL

    @property
    def WS(self) -> int:
        """Width of a split-K partial row (routed, shared, router accumulators; 176)."""
        return self.E_R * self.R_PAD + self.RS_PAD + self.EL

    @property
    def A_rows(self) -> int:
        """Rows of A_cat = [A_all; A_s; W_r] (168)."""
        return self.E * self.r + self.r_s + self.E

    @property
    def lora_cols(self) -> int:
        """What a token actually uses: the chosen experts' and the shared ranks (k*r + r_s = 64)."""
        return self.k * self.r + self.r_s


def block_t_before(T: int, sms: int = 132) -> int:
    """Tokens per shrink program before the SM-filling rule (the plan ``triton-dense-cublas-before``)."""
    return 16 if T <= 16 else 32 if T <= 32 else 64 if T < 8192 else 128


def block_t(T: int, sms: int = 132) -> int:
    """Tokens per shrink program: the largest of 128/64/32 that gives every SM a tile, else 16 (the Triton
    shrink launchers' ``_block_t``; keep in step)."""
    return next((bt for bt in (128, 64, 32) if cdiv(T, bt) >= sms), 16)


def split_k(tiles: int, k: int, sms: int, min_chunk: int = 256, cap: int = 32) -> int:
    """Split-K slices of a reduction of length ``k`` over ``tiles`` output tiles (the Triton ``split_k``)."""
    if tiles >= sms:
        return 1
    return max(1, min(cdiv(2 * sms, max(tiles, 1)), cdiv(k, min_chunk), cap))


def shrink_split(p: Point, reduce_len: int, rule: Callable[[int, int], int] = block_t) -> int:
    return split_k(cdiv(p.T, rule(p.T, p.sms)), reduce_len, p.sms)


def _split_before(p: Point, reduce_len: int) -> int:
    return shrink_split(p, reduce_len, block_t_before)


@dataclass(frozen=True)
class Launch:
    phase: str  # "fwd" or "bwd"
    name: str
    bytes: Callable[[Point], float]
    flops: Callable[[Point], float]
    when: Callable[[Point], bool] = lambda p: True
    note: str = ""  # why it is there; "avoidable: ..." for the passes a better plan drops
    floor: bool = False  # the frozen linear's own GEMM (what the floor also pays)

    def time_s(self, p: Point, dev: Device) -> float:
        return max(self.bytes(p) / dev.hbm_bytes_s, self.flops(p) / dev.mm_flop_s)


def _fwd_outs(p: Point) -> float:
    """Bytes the forward shrink stores: logits, weights+indices, z (fp32), H (16-bit)."""
    return p.T * p.E * 4 + p.T * p.k * 12 + p.T * p.lora_cols * 4 + p.T * p.W * p.size


def _bwd_outs(p: Point) -> float:
    """Bytes the backward shrink stores (dZ and H in 16 bits, d_logits fp32) and reads (logits, z)."""
    return p.T * (p.E * 4 + p.lora_cols * 4 + p.WZ * p.size + p.W * p.size + p.E * 4)


def _gemm(m: str) -> Launch:
    """The frozen GEMM by cuBLAS: forward ``x @ W.T`` or backward ``dy @ W``."""
    def b(p):
        return p.T * p.d_in * p.size + p.d_in * p.d_out * p.size + p.T * p.d_out * p.size

    def f(p):
        return 2.0 * p.T * p.d_in * p.d_out
    return Launch("fwd" if m == "fwd" else "bwd", "cuBLAS x @ W.T" if m == "fwd" else "cuBLAS dy @ W", b, f,
                  floor=True)


def _shrink(phase: str, split: Callable[[Point, int], int], note: str, reduce_note: str) -> list[Launch]:
    """The shrink kernel of ``phase`` (forward: ``x @ A_cat.T`` with the routing epilogue; backward:
    ``dy @ B_cat`` with the routing backward) and its split-K reduce pass, under the token-block rule that
    ``split`` (a Point and the reduction length -> slices) stands for."""
    fwd = phase == "fwd"
    name = "shrink fwd (x @ A_cat.T, routing epilogue)" if fwd else "shrink bwd (dy @ B_cat, routing backward)"
    outs = _fwd_outs if fwd else _bwd_outs

    def red(p):  # the reduction: over x's d_in forward, dy's d_out backward
        return p.d_in if fwd else p.d_out

    def weights(p):  # the rank-space weights read per pass: A_cat forward, B_cat backward
        return (p.A_rows if fwd else p.W) * red(p) * p.size

    def flops(p):
        return 2.0 * p.T * red(p) * (p.WS if fwd else p.W)

    def main_bytes(p):
        s = split(p, red(p))
        return p.T * red(p) * p.size + weights(p) + (s * p.T * p.WS * 4 if s > 1 else outs(p))
    return [Launch(phase, name, main_bytes, flops, note=note),
            Launch(phase, f"shrink {phase} split-K reduce", lambda p: split(p, red(p)) * p.T * p.WS * 4 + outs(p),
                   lambda p: 0.0, when=lambda p: split(p, red(p)) > 1, note=reduce_note)]


_RMW_Y = Launch("fwd", "ext_gemm RMW y += H @ B_cat.T",
                lambda p: 2 * p.T * p.d_out * p.size + p.T * p.W * p.size + p.d_out * p.W * p.size,
                lambda p: 2.0 * p.T * p.d_out * p.W,
                note="a second pass over y (read + write): ranked item 2 (cuBLAS carries the rank space) drops it")

#: Path name -> its launches, forward then backward.
PLANS: dict[str, list[Launch]] = {
    "floor": [_gemm("fwd"), _gemm("bwd")],
    "triton-dense-cublas": [
        *_shrink("fwd", shrink_split, "token block sized so prefill fills the SMs: split-K only at decode sizes",
                 "decode sizes only"),
        _gemm("fwd"),
        _RMW_Y,
        Launch("fwd", "used-expert mask (scatter of the indices)", lambda p: p.T * p.k * 8 + p.E, lambda p: 0.0,
               note="experts no token chose are never read"),
        *_shrink("bwd", shrink_split, "", "decode sizes only"),
        _gemm("bwd"),
        Launch("bwd", "ext_gemm RMW dx += dZ @ A_cat (router term from dZ's 16-bit d_logits)",
               lambda p: 2 * p.T * p.d_in * p.size + p.T * (p.W + p.E) * p.size + p.A_rows * p.d_in * p.size,
               lambda p: 2.0 * p.T * p.d_in * (p.W + p.E),
               note="a second pass over dx; ranked item 2 drops it"),
        Launch("bwd", "cuBLAS dA, dA_s, dW_r = dZ.T @ x",
               lambda p: p.T * p.d_in * p.size + p.T * (p.W + p.E) * p.size + (p.W + p.E) * p.d_in * p.size,
               lambda p: 2.0 * p.T * p.d_in * (p.W + p.E), note="each operand read once"),
        Launch("bwd", "cuBLAS dB, dB_s = dy.T @ H",
               lambda p: p.T * p.d_out * p.size + p.T * p.W * p.size + p.d_out * p.W * p.size,
               lambda p: 2.0 * p.T * p.d_out * p.W, note="each operand read once"),
        Launch("bwd", "idle-expert masks and dB's permute to parameter layout",
               lambda p: 2 * (p.E * p.r * p.d_in + p.E * p.d_out * p.r) * p.size + p.d_out * p.W * p.size * 2,
               lambda p: 0.0, note="two torch.where and one copy"),
    ],
    # The path the H200 last measured (benchmarks/RESULTS.md, 2026-11-26), before the changes above.
    "triton-dense-cublas-before": [
        *_shrink("fwd", _split_before, "split-K when the token blocks do not fill the SMs: fp32 partials",
                 "avoidable: a token block that gives >= SM tiles"),
        _gemm("fwd"),
        _RMW_Y,
        Launch("bwd", "zero-filled grads of unused outputs",
               lambda p: p.T * (p.E + p.k + p.lora_cols) * 4, lambda p: 0.0,
               note="avoidable: ctx.set_materialize_grads(False)"),
        *_shrink("bwd", _split_before, "", "avoidable: a token block that gives >= SM tiles"),
        _gemm("bwd"),
        Launch("bwd", "ext_gemm RMW dx += dZ @ A_cat (+ d_logits @ W_r fp32)",
               lambda p: 2 * p.T * p.d_in * p.size + p.T * p.WZ * p.size + p.T * p.E * 4
               + p.A_rows * p.d_in * p.size,
               lambda p: 2.0 * p.T * p.d_in * p.WZ,
               note="a second pass over dx; the router term from the 16-bit d_logits would drop the fp32 FMA"),
        Launch("bwd", "token_reduce dA, dA_s, dW_r = dZ.T @ x",
               lambda p: cdiv(p.A_rows, 128) * p.T * p.d_in * p.size + p.T * p.A_rows * p.size,
               lambda p: 2.0 * p.T * p.d_in * roundup(p.A_rows, 128),
               note="x read once per 128-row tile of A_cat (twice); avoidable: torch.mm(dZ.T, x)"),
        Launch("bwd", "token_reduce dB, dB_s = dy.T @ H",
               lambda p: cdiv(p.W, 128) * p.T * p.d_out * p.size + p.T * p.W * p.size,
               lambda p: 2.0 * p.T * p.d_out * roundup(p.W, 128),
               note="dy read once per 128-column tile of H (twice); avoidable: torch.mm(dy.T, H)"),
        Launch("bwd", "gradient casts/permutes to parameter layout",
               lambda p: (p.A_rows * p.d_in + p.d_out * p.W) * (4 + p.size), lambda p: 0.0,
               note="about 8 small launches; avoidable: gradients written in parameter layout"),
    ],
}

#: Layer-table method -> plan, or a function of the token count (None: no plan for it). Update with the
#: dispatch: ``triton`` (auto) takes the cuBLAS base from 1024 tokens (the Triton backend's base-mode rule).
METHOD_PLANS: dict[str, str | Callable[[int], str | None]] = {
    "floor": "floor",
    "triton[cublas-base]": "triton-dense-cublas",
    "triton": lambda T: "triton-dense-cublas" if T >= 1024 else None,
}


def plan_for(method: str, tokens: int) -> str | None:
    plan = METHOD_PLANS.get(method)
    return plan(tokens) if callable(plan) else plan


@dataclass(frozen=True)
class LaunchTime:
    phase: str
    name: str
    bytes: float
    flops: float
    seconds: float
    floor: bool
    note: str


def launches(plan: str, p: Point, dev: Device) -> list[LaunchTime]:
    """Each launch of ``plan`` that happens at ``p``, with its roofline time on ``dev``."""
    p = replace(p, sms=dev.sms)
    return [LaunchTime(L.phase, L.name, L.bytes(p), L.flops(p), L.time_s(p, dev), L.floor, L.note)
            for L in PLANS[plan] if L.when(p)]


def predict_s(plan: str, p: Point, dev: Device, phase: str | None = None) -> float:
    """Roofline seconds of ``plan`` at ``p`` on ``dev``: forward (``phase="fwd"``) or forward+backward."""
    return sum(L.seconds for L in launches(plan, p, dev) if phase is None or L.phase == phase)


def flop_limits(p: Point) -> dict[str, float]:
    """Forward+backward FLOPs relative to the frozen linear's for two designs: every expert's columns
    (dense-masked: H and B_cat W wide, A_cat A_rows high) and the chosen experts only (k*r + r_s)."""
    floor = 4.0 * p.d_in * p.d_out
    dense = 2.0 * (3 * p.A_rows * p.d_in + 3 * p.W * p.d_out)
    chosen = 2.0 * (3 * (p.E + p.lora_cols) * p.d_in + 3 * p.lora_cols * p.d_out)
    return {"dense-masked": 1 + dense / floor, "chosen experts": 1 + chosen / floor}


#: The ``--roofline`` table's points: Qwen2-7B FFN up/gate and down, prefill token counts.
SHAPES = tuple((s.name, s.d_in, s.d_out) for s in GPU_SHAPES)
TOKENS = (4096, 16384)


def summary_table(devices: list[str] | None = None, shapes=SHAPES, tokens=TOKENS, size: int = 2) -> str:
    """Markdown: per device, shape and T, the floor's and today's path's roofline fwd and fwd+bwd, and the
    path as the H200 last measured it (``triton-dense-cublas-before``)."""
    lines = ["| device | shape | T | floor fwd+bwd ms | path fwd ms (x floor) | path fwd+bwd ms (x floor) | launches "
             "| as last measured, fwd+bwd (x floor) |", "|---|---|---|---|---|---|---|---|"]
    for key in devices or list(DEVICES):
        dev = DEVICES[key]
        for name, d_in, d_out in shapes:
            for T in tokens:
                p = Point(d_in, d_out, T, size=size)
                fl_f, fl = predict_s("floor", p, dev, "fwd"), predict_s("floor", p, dev)
                pf, pb = predict_s("triton-dense-cublas", p, dev, "fwd"), predict_s("triton-dense-cublas", p, dev)
                n = len(launches("triton-dense-cublas", p, dev))
                old = predict_s("triton-dense-cublas-before", p, dev)
                lines.append(f"| {dev.name} | {name} ({d_in}->{d_out}) | {T} | {fl * 1e3:.3f} | {pf * 1e3:.3f} "
                             f"({pf / fl_f:.3f}x) | {pb * 1e3:.3f} ({pb / fl:.3f}x) | {n} | {old * 1e3:.3f} "
                             f"({old / fl:.3f}x) |")
    return "\n".join(lines)


def launch_table(device: str = "h200", shapes=SHAPES, tokens=TOKENS, size: int = 2) -> str:
    """Markdown: every launch of today's path at each point on ``device``, in microseconds."""
    dev = DEVICES[device]
    lines = [f"Launches of `triton-dense-cublas` on the {dev.name} (roofline us; floor GEMMs marked *)", "",
             "| shape | T | phase | launch | MB | GFLOP | us | note |", "|---|---|---|---|---|---|---|---|"]
    for name, d_in, d_out in shapes:
        for T in tokens:
            for L in launches("triton-dense-cublas", Point(d_in, d_out, T, size=size), dev):
                lines.append(f"| {name} | {T} | {L.phase} | {L.name}{' *' if L.floor else ''} | {L.bytes / 1e6:.1f} | "
                             f"{L.flops / 1e9:.1f} | {L.seconds * 1e6:.1f} | {L.note or '-'} |")
    return "\n".join(lines)


def report(device: str = "h200") -> str:
    """What ``--roofline`` prints: the devices and their sources, the summary, the limits, the launches."""
    out = ["Roofline predictions (no GPU ran this): each launch takes max(bytes / HBM bandwidth, FLOPs / matmul "
           "rate), a path the sum of its launches (no overlap, no launch latency). bf16, E=8, r=16, top-2, r_s=32.",
           "", "Devices:"]
    out += [f"- {d.name}: {d.hbm_bytes_s / 1e12:.2f} TB/s, {d.mm_flop_s / 1e12:.0f} TFLOP/s, {d.sms} SMs ({d.source})"
            for d in DEVICES.values()]
    out += ["", summary_table(), ""]
    for name, d_in, d_out in SHAPES:
        lim = flop_limits(Point(d_in, d_out, 1))
        out.append(f"{name}: FLOP limit {lim['dense-masked']:.3f}x the floor (dense-masked), "
                   f"{lim['chosen experts']:.3f}x (chosen experts only)")
    out += ["", launch_table(device)]
    return "\n".join(out)


__all__ = ["DEVICES", "Device", "METHOD_PLANS", "PLANS", "Launch", "Point", "device_for", "flop_limits",
           "launch_table", "launches", "plan_for", "predict_s", "report", "summary_table"]
