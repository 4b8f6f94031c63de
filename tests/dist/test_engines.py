"""Both MedCare stages on 2 processes (gloo, CPU) under DDP, FSDP2 and DeepSpeed ZeRO-3 vs one process.

Every run is ``medcare train`` (:func:`medcare.cli.train.main`), launched by ``torchrun`` (or ``accelerate
launch``) through ``tests/dist/driver.py``, which adds a recorder and the router skew; the resumed DDP run
is the command itself, ``torchrun ... -m -- medcare train``. Same seed, sequential data order, global batch 4
(one process x 4 or two x 2), AdamW, dropout 0, 4 steps per stage. Per-step losses (and the stage-2
penalty) and the final adapter must match the one-process run to float32 tolerance (only the all-reduce
order differs).

The model and data make routing skewed by rank (``tests/dist/common.py``): in every stage-1
``gate_proj``/``up_proj`` layer rank 0's tokens all take the last expert, rank 1's never do, and one
expert gets no token on either rank, so the reductions see zero gradients from ranks that routed nothing
to an expert. Each run has a timeout: a reduction waiting for a gradient that never comes fails the test.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.dist.common import (ROOT, make_data, make_model_dir, make_tokenizer_dir, read_adapter_tensors,
                               read_record, read_state, run_driver, step_logs, train_flags)

pytest.importorskip("transformers")
pytestmark = pytest.mark.dist

STEPS = 4
FSDP_FLAGS = ["--fsdp", "--fsdp_config", os.path.join(ROOT, "configs", "fsdp2.json")]


def _deepspeed_reason() -> str | None:
    try:
        import deepspeed  # noqa: F401
        from deepspeed.accelerator import get_accelerator
    except Exception as e:  # noqa: BLE001 - any import failure means: not usable here
        return f"DeepSpeed is not importable here ({type(e).__name__}: {e}); pip install deepspeed"
    name = get_accelerator().communication_backend_name()
    if name != "gloo" and not torch.cuda.is_available():
        return f"DeepSpeed's CPU accelerator wants the {name!r} backend (oneCCL); these tests need gloo"
    return None


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The tiny skewed Qwen2 and its tokenizer on disk and the data; ``ws.run(name, stage, nproc, extra)``
    trains once (``console=True``: ``-m medcare train`` itself, without the driver's recorder and skew)."""
    root = tmp_path_factory.mktemp("dist")

    class Workspace:
        model = make_model_dir(str(root / "model"))
        tokenizer = make_tokenizer_dir(str(root / "tokenizer"))
        data = make_data(str(root / "data.jsonl"), STEPS)

        @staticmethod
        def out(name: str) -> str:
            return str(root / name)

        @classmethod
        def run(cls, name: str, stage: int, nproc: int, extra=(), driver_flags=(), expect_rc: int = 0,
                accelerate_config: str | None = None, console: bool = False) -> str:
            out = cls.out(name)
            flags = train_flags(out, cls.model, cls.tokenizer, cls.data, stage, per_device=4 // nproc, steps=STEPS,
                                extra=list(extra))
            proc = run_driver(flags, nproc=nproc, record=out, expect_rc=expect_rc, accelerate_config=accelerate_config,
                              driver_flags=() if console else ("--skew", *driver_flags), console=console)
            # the command's own last line (rank 0): what ran is medcare train, to its end
            if expect_rc == 0:
                assert f"[medcare] stage-{stage} adapter written to {out}" in proc.stdout, proc.stdout[-3000:]
            return out

    return Workspace


@pytest.fixture(scope="module")
def ref1(ws):
    return ws.run("ref1", 1, 1)


@pytest.fixture(scope="module")
def ref2(ws, ref1):
    return ws.run("ref2", 2, 1, ["--from_stage1", ref1])


@pytest.fixture(scope="module")
def ddp1(ws):
    return ws.run("ddp1", 1, 2)


def assert_same_run(run: str, ref: str, keys=("loss",)) -> None:
    """Per-step logged values and every adapter tensor of ``run`` match ``ref``."""
    a, b = read_record(run), read_record(ref)
    assert a["global_step"] == b["global_step"] == STEPS
    for key in keys:
        got, want = step_logs(a, key), step_logs(b, key)
        assert len(got) == len(want) == STEPS, (key, got, want)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6, msg=key)
    ta, tb = read_adapter_tensors(run), read_adapter_tensors(ref)
    assert set(ta) == set(tb)
    for k in tb:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=2e-5, msg=k)
    # the base stayed frozen: same trainable-parameter count, frozen parameters bit-identical
    for rank in (0, 1):
        rec = read_record(run, rank)
        assert rec["frozen_end"] == rec["frozen_begin"], rank
        assert rec["frozen_begin"][1] == b["frozen_begin"][1]


def assert_skewed(run: str) -> None:
    """Rank 0 routed every token of layer 0's gate_proj to the last expert, rank 1 none; expert 0 got none."""
    c0 = torch.tensor(read_record(run, 0)["expert_counts"])
    c1 = torch.tensor(read_record(run, 1)["expert_counts"])
    assert c0.shape[0] >= STEPS and c1.shape[0] >= STEPS
    assert (c0[:, -1] > 0).all() and (c1[:, -1] == 0).all(), (c0, c1)
    assert (c0[:, 0] == 0).all() and (c1[:, 0] == 0).all(), (c0, c1)


def trained_param(run: str) -> dict:
    return read_record(run, 0)["param_info"]


# ---- DDP ----------------------------------------------------------------------------------------------

def test_ddp_stage1_matches_one_process_with_skewed_routing(ddp1, ref1):
    assert_skewed(ddp1)
    assert trained_param(ddp1)["type"] == "Parameter"
    assert_same_run(ddp1, ref1, ("loss", "grad_norm"))


def test_ddp_stage2_matches_one_process(ws, ref1, ref2):
    out = ws.run("ddp2", 2, 2, ["--from_stage1", ref1])
    assert_same_run(out, ref2, ("loss", "orth_penalty", "grad_norm"))
    pen = step_logs(read_record(out), "orth_penalty")
    assert pen[-1] < pen[0]  # the penalty trains


def kill_and_resume(ws, name: str, extra=(), console: bool = False) -> tuple[str, dict]:
    """Stop both processes hard right after the step-2 checkpoint, then resume from it and finish.

    Returns the output directory and the resumed run's record (with ``console``: the resumed run is
    ``torchrun ... -m -- medcare train`` itself, and the record is the ``trainer_state.json`` it writes).
    """
    extra = [*extra, "--save_strategy", "steps", "--save_steps", "2"]
    out = ws.run(name, 1, 2, extra, driver_flags=("--kill_at", "2"), expect_rc=1)
    ckpt = os.path.join(out, "checkpoint-2")
    assert os.path.isfile(os.path.join(ckpt, "adapter.safetensors"))
    assert not os.path.exists(os.path.join(out, "adapter.safetensors"))  # it did stop before the end
    assert read_record(out)["global_step"] == 2
    # the routers (skewed by the first run's driver) come back from the checkpoint's adapter
    ws.run(name, 1, 2, [*extra, "--resume_from_checkpoint", ckpt], console=console)
    record = read_state(out) if console else read_record(out)
    assert record["global_step"] == STEPS
    assert len(step_logs(record, "loss")) == STEPS  # steps 1-2 from the checkpoint's state, 3-4 run
    return out, record


def test_ddp_kill_and_resume_matches_uninterrupted_run(ws, ddp1):
    """The resumed run is the command itself: ``torchrun --nproc_per_node 2 -m -- medcare train ...``."""
    out, record = kill_and_resume(ws, "resume_ddp", console=True)
    got, want = read_adapter_tensors(out), read_adapter_tensors(ddp1)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(torch.tensor(step_logs(record, "loss")),
                               torch.tensor(step_logs(read_record(ddp1), "loss")))


# ---- FSDP2 --------------------------------------------------------------------------------------------

def test_fsdp2_stage1_matches_one_process(ws, ref1):
    """``accelerate launch --config_file configs/fsdp2_accelerate.yaml`` (the shipped config, in float32)."""
    out = ws.run("fsdp1", 1, 2, accelerate_config=os.path.join(ROOT, "configs", "fsdp2_accelerate.yaml"))
    info = trained_param(out)
    assert info["type"] == "DTensor" and info["local_numel"] < info["full_numel"], info  # really sharded
    assert_skewed(out)
    assert_same_run(out, ref1, ("loss", "grad_norm"))


def test_fsdp2_stage2_matches_one_process(ws, ref1, ref2):
    """The Trainer's own FSDP options: ``--fsdp --fsdp_config configs/fsdp2.json``."""
    out = ws.run("fsdp2", 2, 2, ["--from_stage1", ref1, *FSDP_FLAGS])
    info = trained_param(out)
    assert info["type"] == "DTensor" and info["local_numel"] < info["full_numel"], info
    assert_same_run(out, ref2, ("loss", "orth_penalty", "grad_norm"))


def test_fsdp2_kill_and_resume_matches_one_process(ws, ref1):
    """Resuming loads the adapter into the sharded parameters (each rank its shard) and FSDP's optimizer."""
    out, record = kill_and_resume(ws, "resume_fsdp", FSDP_FLAGS)
    got, want = read_adapter_tensors(out), read_adapter_tensors(ref1)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=2e-5, msg=k)
    torch.testing.assert_close(torch.tensor(step_logs(record, "loss")),
                               torch.tensor(step_logs(read_record(ref1), "loss")), rtol=1e-5, atol=1e-6)


# ---- DeepSpeed ZeRO-3 ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def zero3_config(ws, tmp_path_factory):
    reason = _deepspeed_reason()
    if reason:
        pytest.skip(reason)
    import json

    with open(os.path.join(ROOT, "configs", "zero3.json")) as f:
        cfg = json.load(f)
    # partition every parameter, however small (the default keeps tiny ones whole on every rank)
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path_factory.mktemp("ds") / "zero3.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_deepspeed_zero3_stage1_matches_one_process(ws, ref1, zero3_config):
    out = ws.run("ds1", 1, 2, ["--deepspeed", zero3_config])
    info = trained_param(out)
    assert info["zero3"] and info["local_numel"] < info["full_numel"], info  # partitioned
    assert_skewed(out)
    assert_same_run(out, ref1, ("loss", "grad_norm"))


def test_deepspeed_zero3_stage2_penalty_has_its_gradient(ws, ref1, ref2, zero3_config):
    """Stage 2 from the stage-1 adapter into a base partitioned at load time; the penalty trains."""
    out = ws.run("ds2", 2, 2, ["--from_stage1", ref1, "--deepspeed", zero3_config])
    assert trained_param(out)["zero3"]
    assert_same_run(out, ref2, ("loss", "orth_penalty", "grad_norm"))
