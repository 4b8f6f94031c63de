"""benchmarks/gpu_check.sh (``make gpu-check QUICK=1``) without a GPU: the script parses, the real run's
commands parse with their entry points' own argument parsers, and every step starts in its CPU smoke form."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _env(tmp_path, **extra):
    env = {**os.environ, "PYTHON": sys.executable, "OUT_DIR": str(tmp_path), **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_quick_plan_commands_parse_and_fit_in_eight_minutes(tmp_path):
    from medcare_kernels.bench.__main__ import _parser

    subprocess.run(["bash", str(SCRIPT)], env=_env(tmp_path, QUICK="1", GPU_CHECK_PLAN="1"), check=True,
                   capture_output=True, cwd=REPO)
    plan = [shlex.split(line) for line in (tmp_path / "plan.txt").read_text().splitlines()]
    bench = [argv[3:] for argv in plan if argv[1:3] == ["-m", "benchmarks"]]
    modes = set()
    for argv in bench:
        args = _parser().parse_args(argv)
        modes.add("host" if args.host else "e2e" if args.e2e else "roofline" if args.roofline else "layer")
        assert args.roofline or args.device == "cuda"
    assert modes == {"layer", "host", "e2e", "roofline"}
    layer = _parser().parse_args(next(a for a in bench if "--shapes" in a))
    assert layer.shapes == "qwen2-7b-up,qwen2-7b-down" and layer.tokens == "4096,16384"
    assert "triton[cublas-base]" in layer.methods.split(",")
    tests = [argv for argv in plan if argv[1:3] == ["-m", "pytest"]]
    assert any("cuda_graph" in argv for argv in tests) and any(argv[3:5] == ["-m", "gpu"] for argv in tests)
    assert any(argv[-3:] == ["setup.py", "build_ext", "--inplace"] for argv in plan)
    summary = (tmp_path / "gpu-check.md").read_text()
    boxes = [int(b) for b in re.findall(r"planned \(box (\d+) s\)", summary)]
    assert len(boxes) == len(plan) and all(b > 0 for b in boxes)
    deadline = int(re.search(r"GPU_CHECK_DEADLINE:-(\d+)", SCRIPT.read_text()).group(1))
    assert deadline + 15 <= 480  # no step starts past the deadline; each is cut there (+15 s to stop)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None or shutil.which("timeout") is None, reason="needs make and timeout")
def test_make_gpu_check_quick_dry_run_starts_every_step(tmp_path):
    """``make gpu-check QUICK=1`` as the README shows it, with DRY_RUN=1: every step in its CPU form."""
    proc = subprocess.run(["make", "--no-print-directory", "gpu-check", "QUICK=1", "DRY_RUN=1", f"OUT_DIR={tmp_path}",
                           f"GPU_PYTHON={sys.executable}"], env=_env(tmp_path), capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    summary = (tmp_path / "gpu-check.md").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in summary.splitlines() if line.startswith("| ") and "| ok |" in line]
    assert len(rows) == 8, summary
    for name in ("gpu-layer.json", "gpu-host.json", "gpu-e2e.json", "gpu.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    md = (tmp_path / "gpu.md").read_text()
    assert "## MoLoRA layer benchmark" in md and "## Host overhead" in md and "## End to end" in md
    assert "roofline fwd+bwd ms" in md  # the layer table's roofline column (named device, smoke form)
