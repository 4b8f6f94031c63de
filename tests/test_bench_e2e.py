"""The end-to-end table (python -m benchmarks --e2e) on a tiny Qwen2: rows, what trains, the JSON report."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from medcare_kernels.bench import e2e, report  # noqa: E402

TINY = e2e.ModelSize(layers=1, hidden=32, intermediate=64, heads=4, kv_heads=2, vocab=64, batch=2, seq=8)


def test_every_method_trains_what_it_should():
    rows = e2e.run(TINY, rounds=1, warmup=1)
    by = {r.method: r for r in rows}
    assert [r.method for r in rows] == e2e.methods()
    assert by[e2e.FROZEN].trainable_m == 0 and by[e2e.FROZEN].x_frozen == 1.0
    lora = by[e2e.PEFT] if e2e.PEFT in by else by[e2e.OWN_LORA]
    assert lora.x_plain_lora == 1.0
    # the same LoRA (r=16 on q, k, v, o, gate, up, down) whoever builds it
    r, h, i, kv = 16, TINY.hidden, TINY.intermediate, TINY.hidden // TINY.heads * TINY.kv_heads
    per_layer = r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)
    assert by[e2e.OWN_LORA].trainable_m == pytest.approx(per_layer * TINY.layers / 1e6)
    assert lora.trainable_m == by[e2e.OWN_LORA].trainable_m
    assert by[e2e.STAGE1].trainable_m == by[e2e.DENSE].trainable_m > lora.trainable_m
    for row in rows:
        assert row.ms_per_step > 0 and row.tokens_per_s > 0 and row.peak_mib > 0
    table = e2e.table(rows)
    assert table.count("\n") == len(rows) + 1 and "| medcare stage 1 |" in table
    lines = e2e.targets(rows)
    assert lines[0].startswith("medcare stage 1:") and "target <= 1.15x" in lines[0]
    assert "faster than the authors' dense MoLoRA" in lines[1]


def test_prepared_models_share_weights_and_differ_only_in_adapters():
    base = e2e.build_model(TINY, torch.float32, "cpu")
    again = e2e.build_model(TINY, torch.float32, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(base.parameters(), again.parameters()))
    s1 = e2e.prepare(e2e.STAGE1, again)
    names = {n for n, p in s1.named_parameters() if p.requires_grad}
    assert names and all(any(k in n for k in ("lora_", "shared_", "router")) for n in names)


@pytest.mark.parametrize("wanted, error", [(("nope",), "unknown end-to-end methods"), (None, None)])
def test_method_selection(wanted, error):
    if error:
        with pytest.raises(ValueError, match=error):
            e2e.methods(wanted)
    else:
        assert e2e.methods()[0] == e2e.FROZEN
    with pytest.raises(ValueError, match="multiple of heads"):
        e2e.build_model(e2e.ModelSize(hidden=30, heads=4), torch.float32, "cpu")


def test_e2e_cli_quick_writes_json_that_the_report_renders(tmp_path, capsys):
    from medcare_kernels.bench.__main__ import main

    out = tmp_path / "e2e.json"
    assert main(["--e2e", "--quick", "--rounds", "1", "--warmup", "1", "--no-progress", "--layers", "1",
                 "--e2e-methods", "medcare stage 1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "interleaved round by round" in text and "| frozen |" in text and "| medcare stage 1 |" in text
    data = json.loads(out.read_text())
    assert data["kind"] == "e2e" and data["size"]["layers"] == 1
    assert [r["method"] for r in data["rows"]] == [e2e.FROZEN, e2e.STAGE1]
    assert report.render(str(out)).startswith("## End to end")
