"""Checks that say when a measured row does not mean what it seems to (printed beside the row).

A benchmark row can be wrong in ways its numbers do not show: a forward+backward faster than the
forward alone (the noise is larger than the backward), a floor so short that the clock or the GPU
synchronisation is a large part of it, ratios that moved a lot between rounds, a floor of a few
microseconds where every method's time is per-call host overhead (a ratio of 50x then says how much
fixed cost a call has, not how the layer scales), or Triton kernels run by the interpreter.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

#: A sample must last this many clock resolutions (so the clock is <= 1% of it).
RESOLVE_FACTOR = 100
#: Ratios whose per-round interquartile range exceeds this share of their median are flagged as noisy.
NOISY_SPREAD = 0.20
#: Below this per-call floor time the table measures fixed per-call cost (Python, dispatch, launches).
HOST_BOUND_S = 50e-6


def timer_resolution(clock: Callable[[], float] = time.perf_counter, reads: int = 50) -> float:
    """Seconds the clock cannot resolve: the median gap between two back-to-back reads (on a GPU clock
    this includes the synchronisation), or the clock's stated resolution if larger."""
    gaps = []
    for _ in range(reads):
        t0 = clock()
        gaps.append(clock() - t0)
    return max(statistics.median(gaps), time.get_clock_info("perf_counter").resolution)


def row_flags(*, fwd_s: float, fwd_bwd_s: float, floor_call_s: float | None = None,
              floor_sample_s: float | None = None, resolution_s: float | None = None, spread: float | None = None,
              interpreted: bool = False) -> list[str]:
    """Warnings for one row: ``fwd_s`` / ``fwd_bwd_s`` its median per-call times; ``floor_call_s`` the
    floor's per-call time at the same point; ``floor_sample_s`` how long one timed sample of the floor
    lasted and ``resolution_s`` the clock's resolution; ``spread`` the relative IQR of the row's per-round
    forward+backward ratio to the floor; ``interpreted``: Triton kernels ran under ``TRITON_INTERPRET=1``."""
    flags = []
    if interpreted:
        flags.append("Triton interpreter: correctness only, not a speed")
    if fwd_bwd_s < fwd_s:
        flags.append("fwd+bwd < fwd: noise larger than the backward")
    if floor_sample_s is not None and resolution_s is not None and floor_sample_s < RESOLVE_FACTOR * resolution_s:
        flags.append(f"floor sample {floor_sample_s * 1e6:.1f} us < {RESOLVE_FACTOR}x timer resolution "
                     f"({resolution_s * 1e6:.2f} us)")
    if floor_call_s is not None and floor_call_s < HOST_BOUND_S:
        flags.append(f"host-bound: floor {floor_call_s * 1e6:.1f} us/call, ratios are per-call overhead")
    if spread is not None and spread > NOISY_SPREAD:
        flags.append(f"noisy: ratio IQR {100 * spread:.0f}% of its median")
    return flags


def is_meaningful(flags: list[str]) -> bool:
    """False when a flag says the row's timing ratios are not a statement about speed."""
    return not any(f.startswith(("Triton interpreter", "fwd+bwd < fwd", "floor sample")) for f in flags)


__all__ = ["HOST_BOUND_S", "NOISY_SPREAD", "RESOLVE_FACTOR", "is_meaningful", "row_flags", "timer_resolution"]
