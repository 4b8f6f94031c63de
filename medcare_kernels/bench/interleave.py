"""Interleaved timing: every candidate is timed once per round, round after round, in one process.

Timing methods one after another lets a change of machine load (another process, thermal or clock
changes, a noisy neighbour on a shared VM) land on one method and not the others; on this project's
2-core VM that moved single ratios by 15% and more. Here each *round* times every candidate once, in an
order rotated by one position per round (so no candidate always runs right after the same other one,
or first after a pause), and a ratio is the median over rounds of the per-round ratio: the two times
of a pair were taken within the same few milliseconds.

Each sample times ``number`` back-to-back calls (calibrated from the warm-up so a sample lasts at least
``min_sample_s``), between two reads of a clock that first waits for the GPU (the same clock as
``torch.utils.benchmark``'s ``timer``). ``torch.utils.benchmark.Timer`` itself does not fit: its
``blocked_autorange`` measures one statement at a time, and ``timeit`` adds warm-up calls to every
measurement and pins the thread count.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class Candidate:
    """One thing to time: ``fn()`` is one call; ``context()`` is entered around each sample (untimed
    set-up such as environment variables)."""

    name: str
    fn: Callable[[], object]
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


@dataclass
class Timings:
    """Per-call seconds of each candidate, one sample per round (``samples[name][i]``: round ``i``)."""

    samples: dict[str, list[float]]
    number: dict[str, int]  # calls per sample
    order: list[list[str]] = field(default_factory=list)  # the order the candidates ran in, per round

    def median(self, name: str) -> float:
        """Median per-call seconds of ``name``."""
        return statistics.median(self.samples[name])

    def sample_s(self, name: str) -> float:
        """Median seconds of one whole sample of ``name`` (``number`` calls): what the clock resolved."""
        return self.median(name) * self.number[name]

    def ratio(self, name: str, base: str) -> float:
        """Median over rounds of ``t[name] / t[base]``, each pair from the same round."""
        return statistics.median(paired_ratios(self.samples[name], self.samples[base]))

    def spread(self, name: str, base: str) -> float:
        """Interquartile range of the per-round ratios relative to their median (0.1: +-5% around it)."""
        return relative_iqr(paired_ratios(self.samples[name], self.samples[base]))


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """``a[i] / b[i]`` per round; the sequences must be the same length (one sample per round)."""
    if len(a) != len(b):
        raise ValueError(f"paired ratios need one sample per round each, got {len(a)} and {len(b)}")
    return [x / y for x, y in zip(a, b)]


def relative_iqr(values: Sequence[float]) -> float:
    """(75th - 25th percentile) / median of ``values`` (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    med = statistics.median(values)
    return (q3 - q1) / med if med else math.inf


def rotated(names: Sequence[str], round_index: int) -> list[str]:
    """``names`` rotated left by ``round_index`` positions: round 0 runs them as given, round 1 starts
    at the second, and so on, so each candidate takes every position equally often."""
    if not names:
        return []
    k = round_index % len(names)
    return list(names[k:]) + list(names[:k])


def device_clock(device: str | torch.device) -> Callable[[], float]:
    """A seconds clock that first waits for ``device``'s queued work (CUDA), else plain ``perf_counter``."""
    if torch.device(device).type == "cuda":
        def clock() -> float:
            torch.cuda.synchronize()
            return time.perf_counter()
        return clock
    return time.perf_counter


def measure(candidates: Sequence[Candidate], *, rounds: int, warmup: int = 2, min_sample_s: float = 0.0,
            max_number: int = 10_000, device: str | torch.device = "cpu",
            clock: Callable[[], float] | None = None) -> Timings:
    """Time ``candidates`` interleaved: ``warmup`` untimed-for-results calls each (which also calibrate
    ``number``), then ``rounds`` rounds, each timing every candidate once (``number`` calls) in rotated
    order. Returns per-call seconds per round. ``clock`` overrides the device clock (tests)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 (it calibrates the calls per sample), got {warmup}")
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ValueError(f"candidate names must be unique, got {names}")
    clock = clock or device_clock(device)
    by_name = {c.name: c for c in candidates}
    number: dict[str, int] = {}
    for c in candidates:  # warm-up (compilation, caches, allocator), then calls per sample
        best = math.inf
        with c.context():
            for _ in range(warmup):
                t0 = clock()
                c.fn()
                best = min(best, clock() - t0)
        number[c.name] = max(1, min(max_number, math.ceil(min_sample_s / max(best, 1e-9))))
    samples: dict[str, list[float]] = {n: [] for n in names}
    order: list[list[str]] = []
    for i in range(rounds):
        this_round = rotated(names, i)
        order.append(this_round)
        for name in this_round:
            c, n = by_name[name], number[name]
            with c.context():
                t0 = clock()
                for _ in range(n):
                    c.fn()
                samples[name].append((clock() - t0) / n)
    return Timings(samples, number, order)


__all__ = ["Candidate", "Timings", "device_clock", "measure", "paired_ratios", "relative_iqr", "rotated"]
