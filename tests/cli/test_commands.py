"""Each ``medcare`` command in a subprocess on real files: train stage 1 -> train stage 2 -> merge -> reload
with plain transformers; info; bench --quick; demo --quick (deterministic in its seed)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.cli.conftest import alpaca_records, check, run_cli, sharegpt_records, write_jsonl

TRAIN = ["--use_cpu", "--report_to", "none", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2",
         "--logging_steps", "1", "--dataloader_num_workers", "0", "--seed", "0", "--disable_tqdm", "true"]


def test_train_stage1_then_stage2_then_merge_gives_a_plain_checkpoint(tmp_path, tiny_model_dir, demo_examples):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medcare import load_adapter
    from medcare.adapters import read_adapter
    from medcare.cli._common import quiet_to_stage2
    from medcare.config import MedCareConfig

    knowledge = write_jsonl(tmp_path / "knowledge.jsonl", alpaca_records(demo_examples["stage1"], 24))
    triage = tmp_path / "triage.json"  # ShareGPT records as one JSON array
    triage.write_text(json.dumps(sharegpt_records(demo_examples["stage2"], 12), indent=1), encoding="utf-8")

    s1 = tmp_path / "s1"
    proc = check(run_cli("train", "--stage", "1", "--model", str(tiny_model_dir), "--data", str(knowledge),
                         "--output_dir", str(s1), "--max_steps", "4", "--save_steps", "2", "--r", "4",
                         "--num_experts", "4", "--dropout", "0", *TRAIN))
    assert "[medcare] data: 24 examples" in proc.stdout
    assert "next: medcare train --stage 2" in proc.stdout
    meta, tensors = read_adapter(s1)
    assert meta["stage"] == 1 and meta["config"]["r"] == 4 and meta["config"]["num_experts"] == 4
    assert meta["base_model"] == str(tiny_model_dir.resolve())
    assert (s1 / "checkpoint-2" / "adapter.safetensors").is_file() and (s1 / "checkpoint-4").is_dir()
    assert not (s1 / "model.safetensors").exists()  # adapters only
    assert any(k.endswith("mlp.gate_proj.router.weight") for k in tensors)
    logs = json.loads((s1 / "trainer_state.json").read_text())["log_history"]
    assert any("router_aux_loss" in h for h in logs)

    s2 = tmp_path / "s2"  # the base model comes from the stage-1 adapter; the console script
    proc = check(run_cli("train", "--stage", "2", "--from-stage1", str(s1), "--data", str(triage),
                         "--eval_data", str(triage), "--output_dir", str(s2), "--max_steps", "3",
                         "--save_strategy", "no", *TRAIN, console_script=True))
    assert "orthogonal LoRA (rank 8, lambda=1)" in proc.stdout
    meta2, _ = read_adapter(s2)
    assert meta2["stage"] == 2 and meta2["config"]["r"] == 4 and meta2["config"]["num_shared"] == 2
    logs = json.loads((s2 / "trainer_state.json").read_text())["log_history"]
    penalties = [h["orth_penalty"] for h in logs if "orth_penalty" in h]
    assert len(penalties) == 3 and penalties[-1] < penalties[0]
    assert "eval_loss" in json.loads((s2 / "eval_results.json").read_text())

    merged = tmp_path / "merged"
    check(run_cli("merge", "--stage2", str(s2), "--output", str(merged)))
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".merged.*"))  # no temporary directory left behind
    proc = run_cli("merge", "--stage2", str(s2), "--output", str(merged))
    assert proc.returncode == 1 and "already exists (pass --overwrite" in proc.stderr

    # plain transformers loads it, and it computes what base + stage-1 attention + stage-2 adapter computes
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert not any("lora" in n or "orth" in n for n, _ in plain.named_parameters())
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    quiet_to_stage2(reference, MedCareConfig.from_dict(meta2["config"]))
    load_adapter(reference, s2)
    reference.eval()
    tok = AutoTokenizer.from_pretrained(merged)
    ids = tok(tok.apply_chat_template([{"role": "user", "content": "What is warfarin used for?"}], tokenize=False,
                                      add_generation_prompt=True), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        torch.testing.assert_close(plain(**ids).logits, reference(**ids).logits, rtol=1e-4, atol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(**ids).logits
    assert (plain(**ids).logits - base).abs().max() > 1e-4  # the adapters changed something


def test_info_reports_versions_and_backends(tmp_path):
    proc = check(run_cli("info"))
    for needle in ("torch", "transformers", "triton", "GPU:", "CUDA extension", "backends for"):
        assert needle in proc.stdout
    assert "torch" in proc.stdout.split("backends for", 1)[1]
    from medcare.cli.info import collect, render

    info = collect()
    assert set(info) >= {"versions", "gpu", "extension", "backends"}
    assert "torch" in info["backends"]["available"]
    assert render(info).splitlines()[0] == proc.stdout.splitlines()[0]


def test_bench_quick_writes_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    proc = check(run_cli("bench", "--quick", "--no-progress", "--json", str(tmp_path / "b.json"), "--plot",
                         str(tmp_path / "b.png")))
    assert "| shape | T | method |" in proc.stdout and "floor" in proc.stdout
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert {r["method"] for r in rows} >= {"floor", "reference", "torch"}
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_demo_quick_runs_both_stages_and_is_deterministic(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    proc = check(run_cli("demo", "--quick", "--output", str(out), "--seed", "3"))
    assert "## MedCare demo summary" in proc.stdout and "orthogonal penalty" in proc.stdout
    s = json.loads((out / "summary.json").read_text())
    for name in ("summary.md", "loss_curves.png", "expert_load.png", "final-model/model.safetensors",
                 "stage1/adapter.safetensors", "stage2/adapter.safetensors", "base-model/config.json"):
        assert (out / name).is_file(), name
    assert s["stage1"]["loss_after"] < s["stage1"]["loss_before"] - 0.3
    assert s["stage2"]["loss_after"] < s["stage2"]["loss_before"] - 0.3
    assert s["stage2"]["penalty_after"] < s["stage2"]["penalty_before"]
    assert s["reload_max_logit_diff"] < 1e-4
    assert s["backends"]["molora_linear"] == ["torch"]
    load = s["expert_load"]
    assert len(load) == 2 * 3 and all(abs(sum(v) - 1) < 1e-6 for v in load.values())
    assert s["stage1"]["tokens_per_s"] > 0
    ev = s["evaluation"]  # medcare eval on base-model/, stage1/ (its recorded base model) and final-model/
    assert list(ev["models"]) == ["base", "stage1", "final"] and ev["mc_items"] == 60
    assert all(m["n"] == 60 and 0 <= m["accuracy"] <= 1 for m in ev["models"].values())
    assert "stage-1 adapter on" in ev["models"]["stage1"]["model"]
    assert ev["models"]["final"]["triage_reply"] == s["generations"]["triage"]["reply"]
    assert (out / "eval" / "final" / "predictions.jsonl").is_file() and "Held-out evaluation" in proc.stdout

    # the same seed in this process (one thread, as the demo sets) gives the same numbers
    from medcare.cli.demo import run_demo

    threads = torch.get_num_threads()
    try:
        again = run_demo(tmp_path / "again", seed=3, size="quick", plots=False)
    finally:
        torch.set_num_threads(threads)
    for stage, key in [("stage1", "loss_before"), ("stage1", "loss_after"), ("stage2", "loss_after"),
                       ("stage2", "penalty_before"), ("stage2", "penalty_after")]:
        assert again[stage][key] == pytest.approx(s[stage][key], rel=1e-5, abs=1e-6), (stage, key)
    assert again["generations"] == s["generations"]
