"""How many operations one call dispatches: what a GPU shows as launches and the host pays for.

Counted with ``torch.profiler`` (it sees inside custom ops, which a ``TorchDispatchMode`` would count as
one op): *aten ops* are the top-level ``aten::`` events of one call, forward and backward (an aten op
called by another aten op, e.g. ``aten::mm`` under ``aten::matmul``, is part of its caller); *compute
ops* are those minus pure view/metadata ops (``view``, ``t``, ``slice``, ...), which launch nothing; on
a GPU, *kernels* are the device kernels the profiler recorded (CUDA and Triton alike).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

#: Top-level aten ops that only make a new view or read metadata: no kernel, little host time.
VIEW_OPS = frozenset({
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::t", "aten::numpy_T", "aten::transpose",
    "aten::permute", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::expand",
    "aten::expand_as", "aten::as_strided", "aten::alias", "aten::detach", "aten::narrow", "aten::split",
    "aten::split_with_sizes", "aten::chunk", "aten::unbind", "aten::unflatten", "aten::flatten", "aten::lift_fresh",
    "aten::view_as", "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense", "aten::result_type",
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resolve_conj", "aten::resolve_neg",
})


@dataclass(frozen=True)
class OpCount:
    aten_ops: int  # top-level aten ops of one call
    compute_ops: int  # aten_ops minus VIEW_OPS
    kernels: int | None  # device kernels (GPU only; None on the CPU)


def _top_level(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


def classify(events, device_type: str = "cpu") -> OpCount:
    """An :class:`OpCount` of profiler ``events`` (``prof.events()``: objects with ``name``,
    ``cpu_parent`` and ``device_type``)."""
    top = [e for e in events if e.name.startswith("aten::") and _top_level(e)]
    compute = [e for e in top if e.name not in VIEW_OPS]
    kernels = None
    if device_type == "cuda":
        try:  # the profiler's event API moves between torch versions: a missing count is "-", never a crash
            from torch.autograd import DeviceType

            kernels = sum(1 for e in events if getattr(e, "device_type", None) == DeviceType.CUDA
                          and not e.name.lower().startswith(("memcpy", "memset")))
        except Exception:  # noqa: BLE001
            kernels = None
    return OpCount(len(top), len(compute), kernels)


def count(fn: Callable[[], object], device: str = "cpu") -> OpCount:
    """Profile one ``fn()`` (after one unprofiled call, so lazy set-up is not counted)."""
    from torch.profiler import ProfilerActivity, profile

    device_type = torch.device(device).type
    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device_type == "cuda":
            torch.cuda.synchronize()
    return classify(prof.events(), device_type)


__all__ = ["OpCount", "VIEW_OPS", "classify", "count"]
