"""``python -m medcare_kernels.info [--json]``: what this installation can run, for checking a wheel on
a cluster node: versions (medcare-kernels, Python, torch and its CUDA, triton and transformers if
installed), the compiled extension (architectures, the torch and CUDA it was built with), the GPU and
whether the compiled kernels cover it, and the backends available with the reason for each missing one.

Exit status: 0, or 1 with ``--require-cuda`` when the cuda backend cannot run here.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys

import torch

import medcare_kernels
from medcare_kernels import _extension, dispatch
from medcare_kernels.backends import BACKENDS, backend_unavailable_reason


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict[str, object]:
    """Everything the report shows, as plain data."""
    gpu = None
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        gpu = {
            "name": torch.cuda.get_device_name(),
            "capability": f"{cap[0]}.{cap[1]}",
            "count": torch.cuda.device_count(),
            "compiled_kernels_run_here": _extension.loaded() and _extension.runs_on(cap),
        }
    device = "cuda" if gpu else "cpu"
    ext = _extension.build_info()
    if ext.get("loaded"):
        mismatch = []
        if ext["built_with_torch"] != torch.__version__.split("+")[0]:
            mismatch.append(f"built with torch {ext['built_with_torch']}, running {torch.__version__}")
        if torch.version.cuda and ext["built_with_cuda"].split(".")[0] != torch.version.cuda.split(".")[0]:
            mismatch.append(f"built with CUDA {ext['built_with_cuda']}, torch uses CUDA {torch.version.cuda}")
        ext["mismatch"] = mismatch
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
        "backends": _backends(device),
        "dispatch": {
            "preferences": {op: {"order": list(p.order), "decode": list(p.decode)}
                            for op, p in dispatch.PREFERENCES.items()},
            "thresholds": {name: t.value for name, t in dispatch.THRESHOLDS.items()},
            "knobs": {k.name: {"value": _knob_value(k), "default": k.default, "choices": list(k.choices),
                               "scope": k.scope} for k in dispatch.KNOBS},
        },
    }


def _knob_value(k: dispatch.Knob) -> str:
    import os

    return os.environ.get(k.name, "").strip() or k.default


def dispatch_markdown() -> str:
    """The dispatch tables as markdown (``--dispatch``): what README.md's "Dispatch" section shows."""
    lines = ["| op | `auto` on CUDA tensors, fastest first | inference, few tokens |", "|---|---|---|"]
    for op, p in dispatch.PREFERENCES.items():
        lines.append(f"| `{op}` | {', '.join(p.order)} | {', '.join(p.decode) or '-'} |")
    lines += ["", "| threshold | value | rule |", "|---|---|---|"]
    for t in dispatch.THRESHOLDS.values():
        lines.append(f"| `{t.name}` | {t.value} | {t.rule} |")
    lines += ["", "| environment variable | choices | default | what it overrides |", "|---|---|---|---|"]
    for k in dispatch.KNOBS:
        choices = ", ".join(f"`{c}`" for c in k.choices) or "an integer"
        lines.append(f"| `{k.name}` | {choices} | `{k.default}` | {k.overrides} ({k.scope}) |")
    return "\n".join(lines)


def _backends(device: str) -> dict[str, object]:
    available, unavailable = [], {}
    for b in BACKENDS:
        reason = backend_unavailable_reason(b, device)
        if reason is None:
            available.append(b)
        else:  # on a machine without a GPU, say what stands between this backend and a GPU run
            unavailable[b] = (backend_unavailable_reason(b, "cuda") or reason) if device == "cpu" else reason
    return {"device": device, "available": available, "unavailable": unavailable}


def render(info: dict) -> str:
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
    if not ext["loaded"]:
        lines.append(f"  not loaded: {ext['reason']}")
    else:
        archs = ext["archs"]
        lines.append(f"  {ext['path']}")
        lines.append(f"  machine code for: {', '.join('sm_' + a.replace('.', '') for a in archs['sass']) or '-'}"
                     f"; PTX for: {', '.join('compute_' + a.replace('.', '') for a in archs['ptx']) or '-'}")
        lines.append(f"  built with torch {ext['built_with_torch']}, CUDA {ext['built_with_cuda']}")
        for m in ext["mismatch"]:
            lines.append(f"  WARNING: {m}: rebuild the extension for this torch")
    b = info["backends"]
    lines += ["", f"backends for {b['device']} tensors: {', '.join(b['available'])}"]
    for name, reason in b["unavailable"].items():
        lines.append(f"  {name}: unavailable: {reason}")
    d = info["dispatch"]
    lines += ["", "auto's choice for CUDA tensors (medcare_kernels.dispatch; CPU tensors and float64: torch):"]
    for op, p in d["preferences"].items():
        decode = f"; inference with few tokens: {', '.join(p['decode'])}" if p["decode"] else ""
        lines.append(f"  {op:<19} {', '.join(p['order'])}{decode}")
    lines.append("  thresholds: " + ", ".join(f"{n}={v}" for n, v in d["thresholds"].items()))
    lines += ["", "environment knobs:"]
    for name, k in d["knobs"].items():
        changed = "" if k["value"] == k["default"] else f" (default {k['default']})"
        lines.append(f"  {name:<28} {k['value']}{changed}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m medcare_kernels.info", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--dispatch", action="store_true",
                   help="print only the dispatch tables (preferences, thresholds, environment knobs) as markdown")
    p.add_argument("--require-cuda", action="store_true",
                   help="exit 1 unless the cuda backend can run here (the extension loaded and a GPU it covers)")
    args = p.parse_args(argv)
    if args.dispatch:
        print(dispatch_markdown())
        return 0
    info = collect()
    print(json.dumps(info, indent=1) if args.json else render(info))
    if args.require_cuda:
        gpu = info["gpu"]
        if "cuda" not in info["backends"]["available"] or not (gpu and gpu["compiled_kernels_run_here"]):
            print("the cuda backend cannot run here", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
