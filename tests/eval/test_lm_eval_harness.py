"""lm-evaluation-harness on a merged checkpoint agrees with ``medcare eval --method loglik``: the same items
(a local task file whose prompts are medcare's), the same per-option log-likelihoods, acc_norm = the default
(length-normalised) accuracy and acc = ``--normalize none``. Skipped when lm-eval is not installed
(``pip install "medcare-kernels[harness]"``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

TASK = """task: medcare_heldout
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medcare import apply_stage1, merge_and_unload, to_stage2
    from tests.model.tiny import randomize_adapters, small_config

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    apply_stage1(model, small_config())
    to_stage2(model, small_config())
    randomize_adapters(model, scale=2.0)
    out = tmp_path_factory.mktemp("merged")
    merge_and_unload(model).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def _lm_eval(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "lm_eval"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "lm_eval"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False)


def test_lm_eval_accuracy_equals_medcare_eval_loglik(tmp_path, capsys, merged_dir):
    from transformers import AutoTokenizer

    from medcare.cli import main
    from medcare.cli.demo import HELD_OUT_MC, data_file
    from medcare.eval import load_eval_items
    from medcare.eval.prompts import prompt_for

    lines = data_file(HELD_OUT_MC).read_text().splitlines()[::3][:16]  # every subject
    mc = tmp_path / "mc.jsonl"
    mc.write_text("\n".join(lines) + "\n")
    tok = AutoTokenizer.from_pretrained(merged_dir)
    items = load_eval_items(mc)
    docs = [{"prompt": prompt_for(it, tok, instruction=False), "choices": [t for _, t in it.options],
             "gold": it.letters.index(it.answer[0])} for it in items]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "medcare_heldout.yaml").write_text(TASK.format(data=tmp_path / "docs.jsonl"))

    proc = _lm_eval("--model", "hf", "--model_args", f"pretrained={merged_dir},dtype=float32", "--tasks",
                    "medcare_heldout", "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--batch_size",
                    "4", "--output_path", str(tmp_path / "lm-eval"), "--log_samples", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next((tmp_path / "lm-eval").rglob("results_*.json")).read_text())["results"]["medcare_heldout"]
    samples = sorted((json.loads(x) for x in next((tmp_path / "lm-eval").rglob("samples_*.jsonl")).read_text()
                      .splitlines()), key=lambda s: s["doc_id"])

    accuracy = {}
    for normalize in ("chars", "none"):
        out = tmp_path / f"medcare-{normalize}"
        assert main(["eval", "--model", str(merged_dir), "--data", str(mc), "--method", "loglik", "--normalize",
                     normalize, "--output", str(out), "--no_progress"]) == 0
        accuracy[normalize] = json.loads((out / "results.json").read_text())["files"][str(mc)]["choice"]["accuracy"]
    capsys.readouterr()
    assert accuracy["chars"] == pytest.approx(result["acc_norm,none"], abs=1e-9)
    assert accuracy["none"] == pytest.approx(result["acc,none"], abs=1e-9)
    preds = [json.loads(x) for x in (tmp_path / "medcare-chars" / "predictions.jsonl").read_text().splitlines()]
    for pred, sample in zip(preds, samples, strict=True):
        theirs = [float(r[0]) for r in sample["filtered_resps"]]
        assert list(pred["logprobs"].values()) == pytest.approx(theirs, abs=1e-4)
    assert 0 < accuracy["chars"] < 1 or 0 < accuracy["none"] < 1  # a random model: a comparison that can fail
