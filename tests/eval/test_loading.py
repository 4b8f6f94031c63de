"""Stage-1, stage-2 and merged directories give the predictions of the in-memory model they were saved from;
adapters record an absolute base model path, so ``--model STAGE_DIR`` finds its base from anywhere."""

from __future__ import annotations

import os

import pytest
import torch

from medcare import apply_stage1, load_adapter, merge_and_unload, save_adapter, to_stage2
from medcare.adapters import read_adapter
from medcare.eval import EvalLoadError, EvalOptions, evaluate_items, load_eval_items, load_for_eval
from tests.eval.conftest import write_jsonl
from tests.model.tiny import randomize_adapters, small_config


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    from medcare.cli.demo import DATA_FILES, HELD_OUT_MC, data_file

    mc = load_eval_items(data_file(HELD_OUT_MC), limit=6)
    multi = write_jsonl(tmp_path_factory.mktemp("multi") / "multi.jsonl", [
        {"question": "Which two are diuretics?", "options": {"A": "furosemide", "B": "metformin",
                                                             "C": "spironolactone", "D": "aspirin"}, "answer": "AC"}])
    return mc + load_eval_items(multi) + load_eval_items(data_file(DATA_FILES["held_out"]))


def _predict(model, tokenizer, items):
    opts = EvalOptions(method="auto", max_new_tokens=8, batch_size=4, progress=False)
    return evaluate_items(model, tokenizer, items, opts)


def _same(a, b):
    assert [p["pred"] if "pred" in p else p["output"] for p in a] == [p["pred"] if "pred" in p else p["output"]
                                                                      for p in b]
    assert [p.get("output") for p in a] == [p.get("output") for p in b]
    for x, y in zip(a, b):
        if "logprobs" in x:
            assert x["logprobs"] == pytest.approx(y["logprobs"], abs=1e-4)


def _base(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_stage1_stage2_and_merged_directories_predict_as_the_in_memory_model(tmp_path, tiny_model_dir, items):
    model, tok = _base(tiny_model_dir)
    cfg = small_config()
    apply_stage1(model, cfg)
    randomize_adapters(model, scale=2.0)
    model.eval()
    s1 = tmp_path / "stage1"
    save_adapter(model, s1)
    tok.save_pretrained(s1)
    in_memory = _predict(model, tok, items)
    loaded = load_for_eval(str(s1))
    assert loaded.kind == "stage1" and loaded.base == str(tiny_model_dir.resolve())
    _same(in_memory, _predict(loaded.model, loaded.tokenizer, items))
    base_only = _predict(*_base(tiny_model_dir), items)
    assert any(x["logprobs"] != pytest.approx(y["logprobs"], abs=1e-4)
               for x, y in zip(in_memory, base_only) if "logprobs" in x)  # the adapter matters

    to_stage2(model, cfg)  # stage 2 from the in-memory stage 1 (attention LoRA folded, shared -> base LoRA)
    randomize_adapters(model, scale=2.0)
    model.eval()
    s2 = tmp_path / "stage2"
    save_adapter(model, s2)  # no tokenizer saved here: the base model's is used
    in_memory = _predict(model, tok, items)
    loaded = load_for_eval(str(s2))
    assert loaded.kind == "stage2"
    _same(in_memory, _predict(loaded.model, loaded.tokenizer, items))
    explicit = load_for_eval(str(tiny_model_dir), adapter=str(s2))  # --model BASE --adapter DIR
    _same(in_memory, _predict(explicit.model, explicit.tokenizer, items))

    merged_dir = tmp_path / "merged"
    merge_and_unload(model).save_pretrained(merged_dir)
    tok.save_pretrained(merged_dir)
    loaded = load_for_eval(str(merged_dir))
    assert loaded.kind == "merged" and loaded.adapter is None
    _same(in_memory, _predict(loaded.model, loaded.tokenizer, items))


def test_bf16_evaluation_runs_and_stays_close(tmp_path, tiny_model_dir, items):
    model, tok = _base(tiny_model_dir)
    apply_stage1(model, small_config())
    save_adapter(model, tmp_path / "s1")
    loaded = load_for_eval(str(tmp_path / "s1"), bf16=True, device="cpu")
    assert next(loaded.model.model.embed_tokens.parameters()).dtype == torch.bfloat16
    preds = evaluate_items(loaded.model, loaded.tokenizer, items[:3], EvalOptions(bf16=True, progress=False))
    full = evaluate_items(model.eval(), tok, items[:3], EvalOptions(progress=False))
    for x, y in zip(preds, full):
        assert x["logprobs"] == pytest.approx(y["logprobs"], rel=0.05, abs=0.5)


def test_relative_base_paths_are_recorded_absolute(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tiny_model_dir.parent)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir.name)
    apply_stage1(model, small_config())
    save_adapter(model, tmp_path / "s1")
    assert read_adapter(tmp_path / "s1")[0]["base_model"] == str(tiny_model_dir.resolve())
    monkeypatch.chdir(tmp_path)
    assert load_for_eval("s1").base == str(tiny_model_dir.resolve())


def test_load_errors_name_the_argument(tmp_path, tiny_model_dir):
    model, _ = _base(tiny_model_dir)
    apply_stage1(model, small_config())
    save_adapter(model, tmp_path / "s1", base_model_name="")
    with pytest.raises(EvalLoadError, match="does not record its base model.*--model BASE --adapter"):
        load_for_eval(str(tmp_path / "s1"))
    with pytest.raises(EvalLoadError, match="is itself an adapter directory"):
        load_for_eval(str(tmp_path / "s1"), adapter=str(tmp_path / "s1"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(EvalLoadError, match="holds neither a model"):
        load_for_eval(str(tmp_path / "empty"))
    with pytest.raises(EvalLoadError, match="--adapter .* is not a MedCare adapter"):
        load_for_eval(str(tiny_model_dir), adapter=str(tmp_path / "empty"))
    # a stage-1 adapter loaded explicitly on its base works (and load_adapter's own checks apply)
    loaded = load_for_eval(str(tiny_model_dir), adapter=str(tmp_path / "s1"))
    assert loaded.kind == "stage1"
    load_adapter(loaded.model, tmp_path / "s1")  # idempotent
