"""``medcare train --torch_compile`` (the Trainer's ``torch.compile``, inductor): the whole wrapped model compiles
and trains to the eager run's losses and adapter. The first compile dominates on a CPU (see README)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from tests.cli.conftest import check, run_cli, write_jsonl


@pytest.mark.slow
def test_train_with_torch_compile_matches_the_eager_run(tmp_path, tiny_model_dir):
    # equal-length examples: one batch shape, so one compile (variable shapes would recompile, dynamically)
    records = [{"instruction": f"Name the drug class of compound {i}.", "input": "",
                "output": f"Compound {i} is an anticoagulant."} for i in range(8)]
    data = write_jsonl(tmp_path / "data.jsonl", records)
    common = ["train", "--stage", "1", "--model", str(tiny_model_dir), "--data", str(data), "--use_cpu",
              "--report_to", "none", "--per_device_train_batch_size", "4", "--max_steps", "3", "--logging_steps", "1",
              "--learning_rate", "1e-2", "--seed", "0", "--r", "2", "--num_experts", "2", "--dropout", "0",
              "--save_strategy", "no", "--disable_tqdm", "true", "--dataloader_num_workers", "0"]
    start = time.perf_counter()
    check(run_cli(*common, "--output_dir", str(tmp_path / "compiled"), "--torch_compile"))
    compiled_s = time.perf_counter() - start
    start = time.perf_counter()
    check(run_cli(*common, "--output_dir", str(tmp_path / "eager")))
    eager_s = time.perf_counter() - start
    print(f"medcare train, 3 steps, wall: {compiled_s:.0f} s with --torch_compile, {eager_s:.0f} s without")

    def losses(name):
        state = json.loads((tmp_path / name / "trainer_state.json").read_text())
        return [h["loss"] for h in state["log_history"] if "loss" in h]

    assert len(losses("compiled")) == 3
    assert losses("compiled") == pytest.approx(losses("eager"), rel=1e-4)
    from medcare.adapters import read_adapter

    _, a = read_adapter(tmp_path / "compiled")
    _, b = read_adapter(tmp_path / "eager")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5, msg=k)
