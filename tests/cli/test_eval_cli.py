"""``medcare eval`` and ``medcare experts`` in a subprocess on adapter and merged directories (the tables and the
files they write), and their one-line errors in-process."""

from __future__ import annotations

import json

import pytest

from tests.cli.conftest import check, run_cli, write_jsonl


@pytest.fixture(scope="module")
def stage_dirs(tmp_path_factory, tiny_model_dir):
    """A stage-1 adapter (with tokenizer), a stage-2 adapter and the merged checkpoint, from the tiny model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medcare import apply_stage1, merge_and_unload, save_adapter, to_stage2
    from tests.model.tiny import randomize_adapters, small_config

    root = tmp_path_factory.mktemp("stages")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = small_config()
    apply_stage1(model, cfg)
    randomize_adapters(model)
    save_adapter(model, root / "s1")
    tok.save_pretrained(root / "s1")
    to_stage2(model, cfg)
    randomize_adapters(model)
    save_adapter(model, root / "s2")
    merge_and_unload(model).save_pretrained(root / "merged")
    tok.save_pretrained(root / "merged")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from medcare.cli.demo import DATA_FILES, HELD_OUT_MC, data_file

    root = tmp_path_factory.mktemp("data")
    mc = [json.loads(line) for line in data_file(HELD_OUT_MC).read_text().splitlines()[::8][:8]]
    mixed = [{"question": "Which two are diuretics?", "opa": "furosemide", "opb": "metformin",
              "opc": "spironolactone", "opd": "aspirin", "cop": "a", "subject_name": "pharm"},
             {"question": "Is aspirin an antiplatelet drug?", "context": "Aspirin inhibits cyclooxygenase.",
              "final_decision": "yes"},
             {"question": "Warfarin is a?", "choices": ["statin", "anticoagulant"], "answer": 1, "subject": "pharm"}]
    return {"mc": write_jsonl(root / "mc.jsonl", mc), "mixed": write_jsonl(root / "mixed.jsonl", mixed),
            "open": data_file(DATA_FILES["held_out"])}


def test_eval_stage1_dir_writes_results_predictions_and_prints_the_table(tmp_path, stage_dirs, data):
    out = tmp_path / "out"
    proc = check(run_cli("eval", "--model", str(stage_dirs / "s1"), "--data", str(data["mc"]), "--data",
                         str(data["mixed"]), "--data", str(data["open"]), "--output", str(out), "--max_new_tokens",
                         "8", "--batch_size", "3", "--bf16"))
    assert "| file | items | method | accuracy | 95% CI | exact match | ROUGE-L |" in proc.stdout
    assert "| mc.jsonl | 8 | loglik |" in proc.stdout and "| held_out.jsonl | 2 | open |" in proc.stdout
    assert "stage-1 adapter on" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["kind"] == "stage1" and set(res["files"]) == {str(data["mc"]), str(data["mixed"]), str(data["open"])}
    mc = res["files"][str(data["mc"])]
    c = mc["choice"]
    assert c["n"] == 8 and 0 <= c["ci95"][0] <= c["accuracy"] <= c["ci95"][1]
    assert len(mc["subjects"]) >= 2 and sum(s["n"] for s in mc["subjects"].values()) == 8
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 8 + 3 + 2 and all("where" in p and "method" in p for p in preds)
    assert {p["format"] for p in preds} == {"medqa", "medmcqa", "pubmedqa", "list", "instruction"}
    assert (out / "results.md").read_text().startswith("Model: ")
    acc = mc["choice"]["correct"]
    assert sum(p["correct"] for p in preds if p["file"] == str(data["mc"])) == acc


def test_stage2_dir_its_merged_checkpoint_and_base_plus_adapter_agree(tmp_path, stage_dirs, data, tiny_model_dir):
    results = {}
    for name in ("s2", "merged"):
        check(run_cli("eval", "--model", str(stage_dirs / name), "--data", str(data["mc"]), "--method", "generate",
                      "--max_new_tokens", "6", "--output", str(tmp_path / name), "--no_progress"))
        results[name] = [json.loads(x) for x in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
    assert [p["output"] for p in results["s2"]] == [p["output"] for p in results["merged"]]
    assert json.loads((tmp_path / "s2" / "results.json").read_text())["kind"] == "stage2"
    # --model BASE --adapter DIR, in-process: the same replies
    from medcare.cli import main

    assert main(["eval", "--model", str(tiny_model_dir), "--adapter", str(stage_dirs / "s2"), "--data",
                 str(data["mc"]), "--method", "generate", "--max_new_tokens", "6", "--output", str(tmp_path / "ad"),
                 "--no_progress"]) == 0
    explicit = [json.loads(x) for x in (tmp_path / "ad" / "predictions.jsonl").read_text().splitlines()]
    assert [p["output"] for p in explicit] == [p["output"] for p in results["s2"]]


def test_bf16_in_process(capsys, stage_dirs, data):
    from medcare.cli import main

    assert main(["eval", "--model", str(stage_dirs / "s1"), "--data", str(data["mc"]), "--bf16", "--no_progress"]) == 0
    assert "| mc.jsonl | 8 | loglik |" in capsys.readouterr().out


def test_experts_by_subject_writes_json_and_heat_map(tmp_path, stage_dirs, data):
    pytest.importorskip("matplotlib")
    out = tmp_path / "experts"
    proc = check(run_cli("experts", "--model", str(stage_dirs / "s1"), "--data", str(data["mc"]), "--by", "subject",
                         "--output", str(out)))
    assert "| layer 0 gate_proj |" in proc.stdout and "By subject" in proc.stdout
    stats = json.loads((out / "experts.json").read_text())
    assert all(abs(sum(v["load"]) - 1) < 1e-9 for v in stats["layers"].values())
    assert sum(g["items"] for g in stats["groups"].values()) == 8
    assert (out / "experts.png").stat().st_size > 1000


@pytest.mark.parametrize("args, message", [
    (["eval", "--model", "{merged}", "--data", "{bad}"], r"bad\.jsonl:2: .*unknown evaluation record"),
    (["eval", "--model", "{merged}", "--data", "{mc}", "--method", "loglik", "--method", "generate"],
     r"--method is given 2 times for 1 --data files"),
    (["eval", "--model", "{merged}", "--data", "{mc}", "--batch_size", "0"], r"--batch_size must be >= 1"),
    (["eval", "--model", "{empty}", "--data", "{mc}"], r"holds neither a model \(config\.json\) nor a MedCare"),
    (["experts", "--model", "{merged}", "--data", "{mc}"], r"plain checkpoint: routing statistics need"),
    (["experts", "--model", "{s1}", "--data", "{mc}", "--by", "ward"], r"--by ward: no record has this field"),
])
def test_user_errors_are_one_line(tmp_path, capsys, stage_dirs, data, args, message):
    """In-process (the dispatcher prints the one line and returns 1), to spare a Python start-up per case."""
    import re

    from medcare.cli import main

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "Q", "choices": ["x", "y"], "answer": 0}, {"q": 1}])
    (tmp_path / "empty").mkdir()
    paths = {"merged": stage_dirs / "merged", "s1": stage_dirs / "s1", "bad": bad, "mc": data["mc"],
             "empty": tmp_path / "empty"}
    status = main([a.format(**{k: str(v) for k, v in paths.items()}) for a in args] + ["--no_progress"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("medcare ")]
    assert status == 1 and len(lines) == 1 and re.search(message, lines[0]), err[-2000:]
