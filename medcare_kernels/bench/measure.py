"""Timing and peak memory of one benchmark step, on the CPU or a GPU.

GPU times come from ``triton.testing.do_bench`` (CUDA events, cache flushed between runs); CPU times
are the median of repeated ``time.perf_counter`` runs. Peak memory is what the step allocates beyond
what was live before it: ``torch.cuda.max_memory_allocated`` on a GPU, the profiler's allocation
events on the CPU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_time_ms(fn: Callable[[], object], device: str, *, warmup: int = 2, reps: int = 7) -> float:
    if device.startswith("cuda"):
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.typed[0] == _EventType.Allocation:
            allocations.append((event.start_time_ns, event.typed[1].alloc_size))
        stack.extend(event.children)
    live = peak = 0
    for _, size in sorted(allocations):
        live += size
        peak = max(peak, live)
    return peak


def peak_bytes(fn: Callable[[], object], device: str) -> int:
    """Bytes allocated at the peak of ``fn()`` beyond what was allocated before it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return _cpu_peak_bytes(fn)
