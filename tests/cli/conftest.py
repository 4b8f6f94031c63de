"""Fixtures for the CLI tests: a tiny Qwen2 model directory (no downloads) and small data files."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def demo_examples():
    from medcare.cli.demo import DATA_FILES, data_file
    from medcare.data import load_records

    return {k: load_records(data_file(v)) for k, v in DATA_FILES.items()}


@pytest.fixture(scope="session")
def demo_tokenizer(demo_examples):
    from medcare.cli.demo import build_tokenizer

    return build_tokenizer(demo_examples["stage1"] + demo_examples["stage2"], 512)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, demo_tokenizer):
    """A float32 Qwen2 causal LM (2 layers, hidden 32, random init) and its tokenizer, saved to a directory."""
    from medcare.cli.demo import SIZES, build_model

    size = dataclasses.replace(SIZES["quick"], hidden_size=32, intermediate_size=64, num_layers=2)
    path = tmp_path_factory.mktemp("tiny-qwen2")
    model = build_model(demo_tokenizer, size, seed=0)
    model.save_pretrained(path)
    demo_tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def alpaca_records(examples, n):
    out = []
    for ex in examples[:n]:
        out.append({"instruction": ex.messages[0]["content"], "input": "", "output": ex.messages[1]["content"]})
    return out


def sharegpt_records(examples, n):
    roles = {"user": "human", "assistant": "gpt", "system": "system"}
    return [{"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in ex.messages]}
            for ex in examples[:n]]


def run_cli(*args: str, cwd: Path | None = None, console_script: bool = False,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m medcare ARGS`` (or the ``medcare`` console script) in a subprocess: one thread, offline."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore", MPLBACKEND="Agg")
    env.pop("MEDCARE_BACKEND", None)
    if console_script:
        script = Path(sys.executable).parent / "medcare"
        if not script.exists():
            pytest.skip("the medcare console script is not installed next to this Python")
        cmd = [str(script), *args]
    else:
        cmd = [sys.executable, "-m", "medcare", *args]
    return subprocess.run(cmd, cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit status {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n" \
                                 f"{proc.stderr[-5000:]}"
    return proc
