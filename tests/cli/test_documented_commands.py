"""Every shell command that README.md and docs/*.md show in a fenced ``bash``/``sh``/``console`` block is
accounted for here: run by a test as a subprocess on the tiny model, covered by a named test that runs it,
or skipped with the reason (several GPUs or processes, a CUDA toolkit, installs). A new command in the
markdown fails :func:`test_every_documented_command_is_accounted_for` until it is added to ``COMMANDS``."""

from __future__ import annotations

import importlib
import inspect
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.cli.conftest import REPO, alpaca_records, check, run_cli, write_jsonl

DOCS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]

# How each documented command is checked. "run": run by test_documented_training_commands_run_on_the_tiny_model
# (in that order, in one temporary directory, with the documented paths mapped onto the tiny model and data).
# "covered": the named test runs it as a subprocess. "in-process": the named test calls the command's main()
# with its flags (the benchmark tables, whose CPU runs take minutes; their flags are what the test checks).
# "lead": the Makefile targets (tested where they are built). "skip": cannot run on one CPU machine, with why.
_GPU_RUN = ("needs several GPUs/processes; tests/dist runs medcare train under torchrun, accelerate and ZeRO-3 on 2 "
            "CPU processes")
_WHEEL = "building wheels for a GPU cluster (a CUDA toolkit, installs); make wheel is the lead's target"
COMMANDS: dict[str, tuple[str, str]] = {
    "make test": ("lead", "runs this suite"),
    "make lint": ("lead", ".ci/run runs it before make test"),
    "make demo": ("lead", "python -m medcare demo; tests/cli/test_commands.py runs medcare demo --quick"),
    "make wheel": ("lead", _WHEEL),
    "make gpu-check": ("lead", "needs a GPU"),
    "make gpu-check QUICK=1": ("lead", "needs a GPU; tests/test_gpu_check.py runs its DRY_RUN=1 CPU form"),
    "python -m benchmarks --host [--quick] [--threads N] [--backends torch,cuda] [--device cuda] [--json FILE]":
        ("in-process", "tests/test_bench_host.py::test_host_cli_writes_json_that_the_report_renders"),
    "python -m benchmarks --e2e [--quick] [--layers 2 --hidden 896 --intermediate 4864 --heads 14 --kv-heads 2 "
    "--vocab 2048 --batch 4 --seq 256] [--rounds N] [--device cuda] [--json FILE]":
        ("in-process", "tests/test_bench_e2e.py::test_e2e_cli_quick_writes_json_that_the_report_renders"),
    "python -m benchmarks --roofline [--roofline-device h200|h100|a100]":
        ("in-process", "tests/test_bench_roofline.py::test_roofline_cli_prints_the_predictions_without_a_gpu"),
    "medcare bench --quick":
        ("in-process", "tests/test_bench_quick.py::test_medcare_bench_quick_says_how_it_timed_and_flags_what_it_must"),
    "medcare train --stage 1 --model /models/Qwen2.5-7B --data knowledge.jsonl --output_dir runs/s1 --bf16 "
    "--per_device_train_batch_size 4 --gradient_accumulation_steps 8 --learning_rate 2e-4 --num_train_epochs 2 "
    "--lr_scheduler_type cosine --warmup_ratio 0.03 --logging_steps 10 --save_steps 500": ("run", "stage 1"),
    "medcare train --stage 2 --from-stage1 runs/s1 --data clinical.jsonl --output_dir runs/s2 --bf16 "
    "--per_device_train_batch_size 4 --gradient_accumulation_steps 8 --learning_rate 2e-4 --num_train_epochs 2 "
    "--orth_lambda 1.0 --logging_steps 10": ("run", "stage 2"),
    "medcare merge --stage2 runs/s2 --output runs/medcare-7b": ("run", "merge"),
    "medcare bench [--quick] [--json FILE] [--plot FILE.png]":
        ("covered", "tests/cli/test_commands.py::test_bench_quick_writes_json_and_plot"),
    "medcare info": ("covered", "tests/cli/test_commands.py::test_info_reports_versions_and_backends"),
    "medcare demo [--output DIR] [--seed N]":
        ("covered", "tests/cli/test_commands.py::test_demo_quick_runs_both_stages_and_is_deterministic"),
    "python -m medcare_kernels.info": ("run", "the installation report"),
    "medcare eval --model runs/s1 --data medqa_test.jsonl --data medmcqa_dev.json --output runs/s1/eval --bf16":
        ("covered", "tests/cli/test_eval_cli.py::test_eval_stage1_dir_writes_results_predictions_and_prints_the_table"),
    "medcare experts --model runs/s1 --data medmcqa_dev.json --by subject_name --output runs/s1/experts":
        ("covered", "tests/cli/test_eval_cli.py::test_experts_by_subject_writes_json_and_heat_map"),
    "lm_eval --model hf --model_args pretrained=runs/medcare-7b,dtype=bfloat16 --tasks my_task --include_path tasks/ "
    "--device cuda --batch_size 16 --output_path runs/medcare-7b/lm-eval --log_samples":
        ("skip", "a GPU and the optional lm-eval extra; tests/eval/test_lm_eval_harness.py runs lm_eval on the merged "
                 "tiny model with a local task file where lm-eval is installed"),
    "pip install torch==<the cluster's version>": ("skip", _WHEEL),
    "export CUDA_HOME=/usr/local/cuda-12.8": ("skip", _WHEEL),
    'export TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"': ("skip", _WHEEL),
    "pip install dist/medcare_kernels-*.whl": ("skip", _WHEEL),
    'pip install "medcare-kernels[model]"': ("skip", "installs from PyPI (the model extra)"),
}
_MULTI_PROCESS = (
    "torchrun --nproc_per_node 4 -m -- medcare train --stage 1 --model Qwen/Qwen2-7B --data k.jsonl --output_dir s1",
    "accelerate launch --config_file configs/fsdp2_accelerate.yaml -m medcare train ...",
    "torchrun --nproc_per_node 4 -m -- medcare train ... --deepspeed configs/zero3.json",
    "torchrun --nproc_per_node 4 -m -- medcare train --stage 1 --model Qwen/Qwen2-7B --data knowledge.jsonl "
    "--output_dir runs/s1 --per_device_train_batch_size 4 --gradient_accumulation_steps 4 --bf16 --r 16 --alpha 32 "
    "--num_experts 8 --top_k 2 --num_shared 2",
    "torchrun --nproc_per_node 4 -m -- medcare train --stage 2 --from-stage1 runs/s1 --data align.jsonl --output_dir "
    "runs/s2 --per_device_train_batch_size 4 --bf16 --orth_lambda 1.0",
    "accelerate launch --config_file configs/fsdp2_accelerate.yaml --num_processes 4 -m medcare train --stage 1 "
    "--model Qwen/Qwen2-7B --data knowledge.jsonl --output_dir runs/s1 ...",
    "torchrun --nproc_per_node 4 -m -- medcare train ... --fsdp --fsdp_config configs/fsdp2.json",
)
COMMANDS.update({c: ("skip", _GPU_RUN) for c in _MULTI_PROCESS})


def documented_commands(text: str) -> list[str]:
    """The commands of ``text``'s fenced shell blocks: continuations joined, comments and blank lines dropped,
    whitespace collapsed."""
    out = []
    for lang, body in re.findall(r"^```(\w*)[^\n]*\n(.*?)^```", text, re.S | re.M):
        if lang not in ("bash", "sh", "shell", "console"):
            continue
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                out.append(" ".join(line.split()))
    return out


def _all_documented() -> list[tuple[str, str]]:
    return [(doc, c) for doc in DOCS for c in documented_commands((REPO / doc).read_text(encoding="utf-8"))]


def test_every_documented_command_is_accounted_for():
    found = _all_documented()
    assert len(found) >= 20, found  # the extraction works (README + docs/distributed.md)
    missing = [f"{doc}: {c}" for doc, c in found if c not in COMMANDS]
    assert not missing, ("commands shown in the docs that no test runs; add each to COMMANDS in "
                         f"{Path(__file__).name} with how it is run:\n  " + "\n  ".join(missing))
    stale = sorted(set(COMMANDS) - {c for _, c in found})
    assert not stale, f"COMMANDS lists commands the docs no longer show: {stale}"


def test_the_extraction_joins_continuations_and_drops_comments():
    text = ("x\n```bash\n# a comment\nmedcare train --a 1 \\\n    --b 2   # why\n\nmake demo\n```\n"
            "```python\nprint()\n```\n")
    assert documented_commands(text) == ["medcare train --a 1 --b 2", "make demo"]


@pytest.mark.parametrize("command", [c for c, (how, _) in COMMANDS.items() if how == "covered"])
def test_covered_commands_name_a_test_that_runs_them(command):
    path, name = COMMANDS[command][1].split("::")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    source = inspect.getsource(getattr(module, name))
    words = shlex.split(command.replace("[", " ").replace("]", " "))
    assert "run_cli(" in source and f'"{words[1]}"' in source, (command, name)  # a subprocess of that command
    for flag in (w for w in words if w.startswith("--")):
        assert f'"{flag}"' in source, (command, flag)


@pytest.mark.parametrize("command", [c for c, (how, _) in COMMANDS.items() if how == "in-process"])
def test_in_process_commands_name_a_test_that_calls_main_with_their_mode(command):
    """The named test calls the command's ``main([...])`` with its mode flag (``--host``, ``--e2e``, ``--quick``)."""
    path, name = COMMANDS[command][1].split("::")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    source = inspect.getsource(getattr(module, name))
    mode = next(w for w in shlex.split(command.replace("[", " ").replace("]", " ")) if w.startswith("--"))
    assert "main([" in source and f'"{mode}"' in source, (command, name)


@pytest.mark.parametrize("command", [c for c, (how, _) in COMMANDS.items() if how in ("skip", "lead")])
def test_commands_that_cannot_run_here(command):
    pytest.skip(f"{COMMANDS[command][0]}: {COMMANDS[command][1]}")


def _run_documented(command: str, cwd: Path, model: Path) -> subprocess.CompletedProcess:
    """The documented command as written, with the 7B model path mapped onto the tiny model; on a machine
    without a GPU ``--bf16`` needs ``--use_cpu`` (transformers refuses bf16 on the CPU without it)."""
    import torch

    args = shlex.split(command.replace("/models/Qwen2.5-7B", str(model)))
    if not torch.cuda.is_available() and "--bf16" in args:
        args.append("--use_cpu")
    args += ["--report_to", "none", "--disable_tqdm", "true"] if args[:2] == ["medcare", "train"] else []
    if args[0] == "medcare":
        return check(run_cli(*args[1:], cwd=cwd))
    import os
    import sys

    assert args[:2] == ["python", "-m"], args
    return check(subprocess.run([sys.executable, *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=300,
                                env=dict(os.environ, PYTHONPATH=str(REPO))))


def test_documented_training_commands_run_on_the_tiny_model(tmp_path, tiny_model_dir, demo_examples):
    write_jsonl(tmp_path / "knowledge.jsonl", alpaca_records(demo_examples["stage1"], 32))
    write_jsonl(tmp_path / "clinical.jsonl", alpaca_records(demo_examples["stage2"], 32))
    runs = [c for c, (how, _) in COMMANDS.items() if how == "run"]
    assert len(runs) == 4
    outputs = {c: _run_documented(c, tmp_path, tiny_model_dir) for c in runs}
    assert "next: medcare train --stage 2" in outputs[runs[0]].stdout
    state = json.loads((tmp_path / "runs/s1/trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["num_train_epochs"] == 2  # 32 records, batch 4 x 8: 1 step an epoch
    assert "orthogonal LoRA" in outputs[runs[1]].stdout
    assert (tmp_path / "runs/medcare-7b/model.safetensors").is_file()
    assert "backends" in outputs[runs[3]].stdout
