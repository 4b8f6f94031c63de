"""The per-op benchmark harness and the markdown report of ``make gpu-check``, as a quick CPU run."""

from __future__ import annotations

import json

import torch

from medcare_kernels.bench import ops as bench_ops
from medcare_kernels.bench import report


def test_quick_op_benchmark_covers_every_op_and_backend(tmp_path):
    out = tmp_path / "ops.json"
    assert bench_ops.main(["--quick", "--device", "cpu", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["kind"] == "ops" and data["device"] == "cpu" and data["dtype"] == "float32"
    rows = data["rows"]
    assert {r["op"] for r in rows} == {"route", "orthogonal_penalty", "molora_linear decode"}
    assert {r["backend"] for r in rows} >= {"torch", "floor"}
    assert "reference" not in {r["backend"] for r in rows}
    for r in rows:
        assert r["fwd_ms"] > 0
        if r["backend"] == "torch":
            assert r["speedup_fwd"] == 1.0
        if r["op"] == "molora_linear decode":
            assert r["fwd_bwd_ms"] is None
        else:
            assert r["fwd_bwd_ms"] > 0

    md = report.render(str(out))
    assert md.startswith("## Per-op benchmark") and "| route | T=1 E=8 k=2 | torch |" in md
    assert "not produced" in report.render(str(tmp_path / "missing.json"))


def test_report_renders_the_layer_benchmark(tmp_path):
    from medcare_kernels.bench import runner
    rows = runner.run("cpu", torch.float32, *runner.quick_config(), progress=False, only=("torch",),
                      timing=runner.Timing(rounds=1, warmup=1))
    path = tmp_path / "layer.json"
    runner.write_json(rows, str(path), "cpu", torch.float32)
    md = report.render(str(path))
    assert md.startswith("## MoLoRA layer benchmark") and "| torch |" in md and "| floor |" in md
