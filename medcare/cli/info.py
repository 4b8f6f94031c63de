"""``medcare info [--json]``: what this installation can run: versions of medcare-kernels, Python, torch (and
its CUDA), triton and transformers; the GPU and its compute capability; the compiled CUDA extension and its
architectures; the backends available here, with the reason for each missing one.

The report is the one of ``python -m medcare_kernels.info`` when the installed ``medcare_kernels`` has that
module (same facts, same JSON keys); otherwise this module computes the same facts itself.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import platform
from typing import Any

__all__ = ["collect", "main", "render"]


def _kernels_info() -> Any:
    """``medcare_kernels.info`` if this installation has it, else None."""
    try:
        return importlib.import_module("medcare_kernels.info")
    except ModuleNotFoundError as e:
        if e.name != "medcare_kernels.info":
            raise
        return None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _extension() -> Any:
    try:
        return importlib.import_module("medcare_kernels._extension")
    except ModuleNotFoundError as e:
        if e.name != "medcare_kernels._extension":
            raise
        return None


def collect() -> dict[str, Any]:
    """The report as plain data: ``versions``, ``gpu``, ``extension``, ``backends``."""
    mod = _kernels_info()
    if mod is not None:
        return mod.collect()
    import torch

    import medcare_kernels
    from medcare_kernels.backends import BACKENDS, backend_unavailable_reason

    ext_mod = _extension()
    gpu = None
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        runs = bool(ext_mod and ext_mod.loaded() and hasattr(ext_mod, "runs_on") and ext_mod.runs_on(cap))
        gpu = {"name": torch.cuda.get_device_name(), "capability": f"{cap[0]}.{cap[1]}",
               "count": torch.cuda.device_count(), "compiled_kernels_run_here": runs}
    if ext_mod is not None and hasattr(ext_mod, "build_info"):
        ext = ext_mod.build_info()
    else:
        ext = {"loaded": False, "reason": "this medcare-kernels has no compiled CUDA extension"}
    device = "cuda" if gpu else "cpu"
    available, unavailable = [], {}
    for b in BACKENDS:
        reason = backend_unavailable_reason(b, device)
        if reason is None:
            available.append(b)
        else:
            unavailable[b] = (backend_unavailable_reason(b, "cuda") or reason) if device == "cpu" else reason
    return {
        "versions": {
            "medcare-kernels": medcare_kernels.__version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch cuda": torch.version.cuda,
            "triton": _version("triton"),
            "transformers": _version("transformers"),
        },
        "gpu": gpu,
        "extension": ext,
        "backends": {"device": device, "available": available, "unavailable": unavailable},
    }


def render(info: dict[str, Any]) -> str:
    """The human-readable report."""
    mod = _kernels_info()
    if mod is not None:
        return mod.render(info)
    lines = ["medcare-kernels installation report", "", "versions:"]
    for name, v in info["versions"].items():
        lines.append(f"  {name:<16} {v if v is not None else 'not installed'}")
    gpu = info["gpu"]
    lines += ["", "GPU:"]
    if gpu is None:
        lines.append("  none visible to torch")
    else:
        lines.append(f"  {gpu['name']} (compute capability {gpu['capability']}, {gpu['count']} visible)")
        lines.append("  compiled kernels cover it: " + ("yes" if gpu["compiled_kernels_run_here"] else "NO"))
    ext = info["extension"]
    lines += ["", "CUDA extension (medcare_kernels._C):"]
    if not ext.get("loaded"):
        lines.append(f"  not loaded: {ext.get('reason')}")
    else:
        archs = ext.get("archs", {})
        lines.append(f"  {ext.get('path')}")
        sass = ", ".join("sm_" + a.replace(".", "") for a in archs.get("sass", [])) or "-"
        ptx = ", ".join("compute_" + a.replace(".", "") for a in archs.get("ptx", [])) or "-"
        lines.append(f"  machine code for: {sass}; PTX for: {ptx}")
        lines.append(f"  built with torch {ext.get('built_with_torch')}, CUDA {ext.get('built_with_cuda')}")
    b = info["backends"]
    lines += ["", f"backends for {b['device']} tensors: {', '.join(b['available'])}"]
    for name, reason in b["unavailable"].items():
        lines.append(f"  {name}: unavailable: {reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    mod = _kernels_info()
    if mod is not None and hasattr(mod, "main"):
        return int(mod.main(argv) or 0)
    p = argparse.ArgumentParser(prog="medcare info", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=1) if args.json else render(info))
    return 0
