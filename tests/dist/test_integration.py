"""In-process checks of what the model layer does for the engines (the multi-process runs are in
``test_engines.py``): ZeRO-3 leaf flags, the DDP setting MedCareTrainer chooses, who writes adapters."""

from __future__ import annotations

import warnings

import pytest
import torch

from medcare import MedCareTrainer, apply_stage1, save_adapter
from medcare.adapters import ADAPTER_WEIGHTS_NAME
from medcare.distributed import copy_full_, full_params, gathered, is_global_rank_zero, is_sharded, param_shape
from medcare.modules import LoRALinear, MoLoRALinear, OrthLoRALinear
from tests.model.tiny import small_config, tiny_model

transformers = pytest.importorskip("transformers")


def _args(tmp_path, **kw):
    return transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kw)


def test_wrappers_are_zero3_leaf_modules():
    model = apply_stage1(tiny_model("qwen2"), small_config())
    wrappers = [m for m in model.modules() if isinstance(m, (MoLoRALinear, LoRALinear))]
    assert wrappers and all(m._z3_leaf for m in wrappers)
    assert OrthLoRALinear._z3_leaf
    try:
        from deepspeed.utils import z3_leaf_module
    except Exception:  # noqa: BLE001 - DeepSpeed is optional
        return
    assert all(z3_leaf_module(m) for m in wrappers)
    assert not z3_leaf_module(model.model.layers[0])


def test_trainer_runs_ddp_without_find_unused_parameters(tmp_path):
    model = apply_stage1(tiny_model("qwen2"), small_config())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = _args(tmp_path)
        assert args.ddp_find_unused_parameters is None
        trainer = MedCareTrainer(model=model, args=args)
        assert trainer.args.ddp_find_unused_parameters is False
        handler = getattr(trainer.accelerator, "ddp_handler", None)
        if handler is not None:
            assert handler.find_unused_parameters is False
        # an explicit choice is kept
        args = _args(tmp_path, ddp_find_unused_parameters=True)
        MedCareTrainer(model=model, args=args)
        assert args.ddp_find_unused_parameters is True


def test_save_adapter_writes_only_on_the_main_process(tmp_path):
    model = apply_stage1(tiny_model("qwen2"), small_config())
    assert is_global_rank_zero()  # no process group here
    save_adapter(model, tmp_path / "no", is_main_process=False)
    assert not (tmp_path / "no" / ADAPTER_WEIGHTS_NAME).exists()
    save_adapter(model, tmp_path / "yes")
    assert (tmp_path / "yes" / ADAPTER_WEIGHTS_NAME).is_file()


def test_helpers_leave_whole_parameters_alone():
    p = torch.nn.Parameter(torch.randn(3, 4))
    assert not is_sharded(p) and param_shape(p) == (3, 4)
    assert full_params([p])[0] is p  # the penalty's graph reaches p directly
    with gathered([p], modifier_rank=0):
        copy_full_(p, torch.ones(3, 4, dtype=torch.float64))
    assert p.dtype == torch.float32 and torch.equal(p.detach(), torch.ones(3, 4))
    # a ZeRO-3 parameter partitioned at load time is empty here; its full shape is ds_shape
    q = torch.nn.Parameter(torch.empty(0))
    q.ds_id, q.ds_shape = 7, torch.Size([5, 6])
    assert is_sharded(q) and param_shape(q) == (5, 6)
    m = MoLoRALinear(q, None, small_config())  # wraps it (apply_stage1 after from_pretrained under zero.Init)
    assert (m.out_features, m.in_features) == (5, 6)
    assert m.lora_A.shape == (4, 4, 6) and m.lora_B.shape == (4, 5, 4) and m.router.weight.shape == (4, 6)


@pytest.mark.parametrize("rank, expected", [(None, True), ("0", True), ("1", False), ("3", False)])
def test_global_rank_zero_reads_the_launcher_rank_before_the_process_group_exists(monkeypatch, rank, expected):
    assert not torch.distributed.is_initialized()
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    assert is_global_rank_zero() is expected
