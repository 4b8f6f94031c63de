"""Adapter files: exact round trips, stage 1 -> 2 in a new process, failed loads and saves change nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import medcare.adapters as adapters_mod
from medcare import (
    MoLoRALinear,
    OrthLoRALinear,
    apply_stage1,
    load_adapter,
    merge_and_unload,
    merge_lora,
    save_adapter,
    to_stage2,
)
from medcare.adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, AdapterError, read_adapter
from tests.model.tiny import (
    adapter_params,
    logits,
    quiet_to_stage2,
    randomize_adapters,
    small_config,
    tiny_model,
    tokens,
)


def _stage1(seed=0, **cfg):
    model = apply_stage1(tiny_model("qwen2", seed=0), small_config(**cfg))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        randomize_adapters(model)
    return model


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stage1_round_trip_is_exact(tmp_path):
    src = _stage1(seed=1)
    out = save_adapter(src, tmp_path / "s1")
    assert sorted(os.listdir(out)) == [ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME]
    meta = json.loads((out / ADAPTER_CONFIG_NAME).read_text())
    assert meta["stage"] == 1 and meta["config"]["r"] == 4 and meta["library_version"]
    assert meta["modules"]["model.layers.0.mlp.gate_proj"]["kind"] == "molora"
    assert meta["tensors"]["model.layers.0.mlp.gate_proj.lora_A"]["shape"] == [4, 4, 32]
    assert "base_model" in meta

    dst = _stage1(seed=2)
    assert not _same_state(adapter_params(src), adapter_params(dst))
    got = load_adapter(dst, out)
    assert got["save_id"] == meta["save_id"]
    assert _same_state(adapter_params(src), adapter_params(dst))
    ids = tokens()
    assert torch.equal(logits(src, ids), logits(dst, ids))


def test_stage2_round_trip_is_exact(tmp_path):
    cfg = small_config()
    src = to_stage2(merge_lora(_stage1(seed=3), "attn"), cfg)
    randomize_adapters(src)
    save_adapter(src, tmp_path / "s2")
    dst = to_stage2(merge_lora(_stage1(seed=3), "attn"), cfg)
    load_adapter(dst, tmp_path / "s2")
    assert _same_state(_state(src), _state(dst))


def test_stage1_adapter_builds_stage2_in_a_new_process(tmp_path):
    """to_stage2(fresh base) + load_adapter(stage-1 dir) == the in-process merge_lora + to_stage2."""
    cfg = small_config()
    model = _stage1(seed=4)
    save_adapter(model, tmp_path / "s1")
    to_stage2(merge_lora(model, "attn"), cfg)
    ids = tokens()
    expect = logits(model, ids)

    fresh = quiet_to_stage2(tiny_model("qwen2", seed=0), cfg)
    load_adapter(fresh, tmp_path / "s1")
    torch.testing.assert_close(logits(fresh, ids), expect, rtol=0, atol=0)
    for (n, a), (_, b) in zip(model.named_modules(), fresh.named_modules()):
        if isinstance(a, OrthLoRALinear):
            assert torch.equal(a.base_A, b.base_A) and torch.equal(a.base_B, b.base_B), n
            assert not b.base_A.requires_grad and b.orth_A.requires_grad and torch.all(b.orth_B == 0)

    # loading it again (or into the in-process model) must not fold the attention LoRA twice
    load_adapter(fresh, tmp_path / "s1")
    load_adapter(model, tmp_path / "s1")
    torch.testing.assert_close(logits(fresh, ids), expect, rtol=0, atol=0)
    torch.testing.assert_close(logits(model, ids), expect, rtol=0, atol=0)


def test_stage2_adapter_alone_rebuilds_the_final_model_for_plain_transformers(tmp_path):
    cfg = small_config()
    model = to_stage2(merge_lora(_stage1(seed=5), "attn"), cfg)
    randomize_adapters(model)
    save_adapter(model, tmp_path / "s2")
    meta, _ = read_adapter(tmp_path / "s2")
    assert meta["stage"] == 2
    assert meta["modules"]["model.layers.1.self_attn.q_proj"] == {**meta["modules"]["model.layers.1.self_attn.q_proj"],
                                                                  "kind": "lora", "merged": True}
    ids = tokens()
    expect = logits(model, ids)

    rebuilt = quiet_to_stage2(tiny_model("qwen2", seed=0), cfg)
    load_adapter(rebuilt, tmp_path / "s2")
    torch.testing.assert_close(logits(rebuilt, ids), expect, rtol=0, atol=0)

    merge_and_unload(rebuilt)
    torch.testing.assert_close(logits(rebuilt, ids), expect, rtol=1e-5, atol=1e-5)
    rebuilt.save_pretrained(tmp_path / "final")
    torch.save({"ids": ids, "logits": logits(rebuilt, ids)}, tmp_path / "expect.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "final")!r}).eval()
        e = torch.load({str(tmp_path / "expect.pt")!r})
        with torch.no_grad():
            got = model(input_ids=e["ids"]).logits
        torch.testing.assert_close(got, e["logits"], rtol=0, atol=1e-6)
        assert not any(m.startswith("medcare") for m in sys.modules), "medcare was imported"
        print("OK")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ""}, cwd=tmp_path)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-3000:]


def test_truncated_adapter_raises_and_leaves_the_model_unchanged(tmp_path):
    save_adapter(_stage1(seed=6), tmp_path / "a")
    file = tmp_path / "a" / ADAPTER_WEIGHTS_NAME
    data = file.read_bytes()
    model = _stage1(seed=7)
    before = _state(model)
    for cut in (len(data) // 2, 7, len(data) - 1):
        file.write_bytes(data[:cut])
        with pytest.raises(AdapterError, match="truncated|corrupt|cannot read"):
            load_adapter(model, tmp_path / "a")
        assert _same_state(before, _state(model))
    with pytest.raises(AdapterError, match="no adapter"):
        load_adapter(model, tmp_path / "missing")


def test_mismatched_adapter_lists_the_keys_and_leaves_the_model_unchanged(tmp_path):
    save_adapter(_stage1(seed=8, r=8, alpha=16), tmp_path / "r8")
    model = _stage1(seed=9)  # r = 4, same scale alpha/r = 2
    before = _state(model)
    with pytest.raises(AdapterError) as e:
        load_adapter(model, tmp_path / "r8")
    assert "model.layers.0.mlp.gate_proj.lora_A" in e.value.keys
    assert "model.layers.1.self_attn.q_proj.lora_B" in e.value.keys
    assert "adapter shape [4, 8, 32], model expects [4, 4, 32]" in str(e.value)
    assert _same_state(before, _state(model))

    # names: an adapter for FFN-only targets does not cover the model's attention LoRAs
    save_adapter(_stage1(seed=8, attn_targets=()), tmp_path / "ffn_only")
    with pytest.raises(AdapterError, match="missing from the adapter") as e:
        load_adapter(model, tmp_path / "ffn_only")
    assert "model.layers.0.self_attn.q_proj" in e.value.keys
    assert _same_state(before, _state(model))

    # scale
    save_adapter(_stage1(seed=8, alpha=16), tmp_path / "alpha16")
    with pytest.raises(AdapterError, match="scale"):
        load_adapter(model, tmp_path / "alpha16")

    # stage: a stage-2 adapter does not load into a stage-1 model, nor anything into a plain model
    s2 = to_stage2(merge_lora(_stage1(seed=8), "attn"), small_config())
    save_adapter(s2, tmp_path / "s2")
    with pytest.raises(AdapterError, match="to_stage2"):
        load_adapter(model, tmp_path / "s2")
    with pytest.raises(AdapterError, match="apply_stage1"):
        load_adapter(tiny_model(), tmp_path / "s2")
    assert _same_state(before, _state(model))


def test_a_different_folded_attention_lora_is_refused(tmp_path):
    save_adapter(_stage1(seed=10), tmp_path / "a")
    save_adapter(_stage1(seed=11), tmp_path / "b")
    model = quiet_to_stage2(tiny_model(), small_config())
    load_adapter(model, tmp_path / "a")
    before = _state(model)
    with pytest.raises(AdapterError, match="already folded"):
        load_adapter(model, tmp_path / "b")
    assert _same_state(before, _state(model))


def test_interrupted_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    first = _stage1(seed=12)
    save_adapter(first, tmp_path / "a")
    second = _stage1(seed=13)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(adapters_mod, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(second, tmp_path / "a")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "a")) == [ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME]  # no temp files left
    load_adapter(second, tmp_path / "a")
    assert _same_state(adapter_params(first), adapter_params(second))

    # a crash between the two renames: the weights file (the authority) is new, the JSON copy stale -> warns
    third = _stage1(seed=14)
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(ADAPTER_CONFIG_NAME):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(adapters_mod.os, "replace", replace)
    with pytest.raises(OSError):
        save_adapter(third, tmp_path / "a")
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="another save"):
        load_adapter(second, tmp_path / "a")
    assert _same_state(adapter_params(third), adapter_params(second))


def test_save_needs_medcare_layers(tmp_path):
    with pytest.raises(ValueError, match="no MedCare layers"):
        save_adapter(tiny_model(), tmp_path)


def test_adapter_loads_into_bf16_model_lora_params(tmp_path):
    src = _stage1(seed=15)
    save_adapter(src, tmp_path / "a")
    dst = apply_stage1(tiny_model().to(torch.bfloat16), small_config(lora_dtype=None))
    load_adapter(dst, tmp_path / "a")
    m = dst.model.layers[0].mlp.up_proj
    assert isinstance(m, MoLoRALinear) and m.lora_A.dtype == torch.bfloat16
    torch.testing.assert_close(m.lora_A.float(), src.model.layers[0].mlp.up_proj.lora_A, rtol=1e-2, atol=1e-2)
