"""The host-overhead table (python -m benchmarks --host) and the op counter: rows, columns, counts."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from medcare_kernels.bench import host, opcount, report

OPS = ("lora_linear", "molora_linear", "route", "orthogonal_penalty")


def _ev(name, parent=None, device_type="cpu"):
    return SimpleNamespace(name=name, cpu_parent=parent, device_type=device_type)


def test_classify_counts_top_level_aten_ops_and_views():
    custom = _ev("medcare_kernels::molora_linear")
    linear = _ev("aten::linear", custom)  # top level: its parent is not an aten op
    events = [custom, linear, _ev("aten::addmm", linear), _ev("aten::t", linear), _ev("aten::view", custom),
              _ev("aten::mul"), _ev("autograd::engine::evaluate_function: MulBackward0")]
    c = opcount.classify(events)
    assert (c.aten_ops, c.compute_ops, c.kernels) == (3, 2, None)


def test_count_profiles_one_call():
    x, w = torch.randn(4, 8, requires_grad=True), torch.randn(8, 8)

    def call():
        y = torch.nn.functional.linear(x, w) * 2.0
        torch.autograd.grad(y.sum(), [x])
    c = opcount.count(call)
    assert c.aten_ops >= 4 and 0 < c.compute_ops <= c.aten_ops and c.kernels is None


def test_backends_skip_the_interpreter_unless_named(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "triton" not in host.backends("cpu") and "torch" in host.backends("cpu")
    assert host.backends("cpu", ("triton",)) == ["triton"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_host_table_rows_cover_every_op_and_backend(dtype):
    rows = host.run("cpu", dtype, rounds=2, warmup=1, min_sample_s=0.0, include=("torch", "reference"))
    keys = [(r.op, r.backend) for r in rows]
    assert keys[:4] == [(host.FLOOR, "-"), (host.PLAIN_LORA, "-"), ("plain route", "-"), ("plain penalty", "-")]
    assert set(keys[4:]) == {(op, b) for op in OPS for b in ("torch", "reference")}
    lora = rows[1]
    assert lora.fwd_x_lora == lora.fwd_bwd_x_lora == 1.0 and rows[0].fwd_bwd_x_linear == 1.0
    for r in rows:
        assert r.fwd_us > 0 and r.fwd_bwd_us > 0 and 0 < r.compute_ops <= r.aten_ops and r.kernels is None
    by = {(r.op, r.backend): r for r in rows}
    # the three-line LoRA really is three lines of aten ops; the library's op does more, not fewer
    assert by[(host.FLOOR, "-")].aten_ops < by[(host.PLAIN_LORA, "-")].aten_ops
    assert by[("molora_linear", "torch")].aten_ops > by[(host.PLAIN_LORA, "-")].aten_ops

    table = host.table(rows)
    head, sep, *body = table.splitlines()
    assert len(body) == len(rows) and all(line.count("|") == head.count("|") == sep.count("|") for line in body)
    lines = host.targets(rows)
    assert len(lines) == 2 and lines[0].startswith("lora_linear[torch]") and "target <= 1.5x" in lines[0]


def test_host_cli_writes_json_that_the_report_renders(tmp_path):
    from medcare_kernels.bench.__main__ import main

    out = tmp_path / "host.json"
    assert main(["--host", "--quick", "--threads", "1", "--device", "cpu", "--rounds", "1", "--warmup", "1",
                 "--backends", "torch", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["kind"] == "host" and {r["op"] for r in data["rows"]} >= set(OPS)
    md = report.render(str(out))
    assert md.startswith("## Host overhead") and "interleaved" in md and "| molora_linear | torch |" in md


@pytest.mark.parametrize("us, verdict", [(120.0, "met"), (151.0, "not met")])
def test_gpu_rows_get_the_host_time_target_and_a_kernels_column(us, verdict):
    rows = [host.HostRow("molora_linear", "triton", 50.0, us, 1.0, 2.0, 3.0, 100, 60, 42),
            host.HostRow("molora_linear", "torch", 50.0, us, 1.0, 2.0, 3.0, 100, 60, None)]
    lines = host.targets(rows)
    assert f"{us:.0f} us per call on the GPU (target <= 150 us: {verdict})" in lines[1] and len(lines) == 3
    head, sep, a, b = host.table(rows).splitlines()
    assert "| kernels |" in head and "| 42 |" in a and "| - |" in b
    assert head.count("|") == sep.count("|") == a.count("|") == b.count("|")
