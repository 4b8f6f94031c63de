"""MedCareTrainer: the extra loss terms, their gradient-accumulation scaling, metrics and adapter checkpoints."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from medcare import MedCareTrainer, apply_stage1, load_adapter, merge_lora, to_stage2
from medcare.adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from tests.model.tiny import adapter_params, randomize_adapters, small_config, tiny_model

transformers = pytest.importorskip("transformers")


def dataset(n=8, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 96, (n, seq), generator=g)
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids]


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=4,
                logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                dataloader_num_workers=0, seed=0, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def stage2_model(orth_lambda=1.0, seed=0):
    cfg = small_config(orth_lambda=orth_lambda)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = apply_stage1(tiny_model("qwen2"), cfg)
        randomize_adapters(model)
        to_stage2(merge_lora(model, "attn"), cfg)
        randomize_adapters(model)  # orth B != 0 too, so both orth factors get task gradients
    return model


def train(model, tmp_path, data, accepts_loss_kwargs=None, **kw):
    trainer = MedCareTrainer(model=model, args=args(tmp_path, **kw), train_dataset=data)
    if accepts_loss_kwargs is not None:  # False: the Trainer itself divides the loss by the GA steps
        trainer.model_accepts_loss_kwargs = accepts_loss_kwargs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer


def orth_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".orth_" in n}


@pytest.mark.parametrize("accepts_loss_kwargs", [True, False])
def test_stage2_penalty_is_scaled_consistently_with_gradient_accumulation(tmp_path, accepts_loss_kwargs):
    """One SGD step on 4 samples == two accumulated micro-batches of 2, penalty included."""
    data = dataset(4)
    sgd = dict(optim="sgd", learning_rate=0.05, max_steps=1, max_grad_norm=0.0,
               accepts_loss_kwargs=accepts_loss_kwargs)
    one = stage2_model()
    two = stage2_model()
    start = orth_state(one)
    train(one, tmp_path / "a", data, per_device_train_batch_size=4, gradient_accumulation_steps=1, **sgd)
    train(two, tmp_path / "b", data, per_device_train_batch_size=2, gradient_accumulation_steps=2, **sgd)
    a, b = orth_state(one), orth_state(two)
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-4, atol=1e-6, msg=n)
    # not vacuous: without the penalty the step differs
    free = stage2_model(orth_lambda=0.0)
    train(free, tmp_path / "c", data, per_device_train_batch_size=4, **sgd)
    c = orth_state(free)
    assert any((c[n] - a[n]).abs().max() > 1e-3 for n in a)
    moved = sum((a[n] - start[n]).abs().sum() for n in a)
    assert moved > 0


def test_stage2_training_logs_the_penalty_lowers_it_and_checkpoints_adapters(tmp_path):
    model = stage2_model(orth_lambda=1.0)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".base_" in n}
    trainer = train(model, tmp_path, dataset(8), max_steps=6, save_strategy="steps", save_steps=3)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 6 and all("orth_penalty" in h for h in logs)
    assert logs[-1]["orth_penalty"] < logs[0]["orth_penalty"]
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if n in base_before)
    ckpt = tmp_path / "checkpoint-3"
    files = set(os.listdir(ckpt))
    assert {ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME, "trainer_state.json"} <= files
    assert "model.safetensors" not in files

    # resume from the adapter-only checkpoint into a freshly prepared model: same end point as the run above
    fresh = stage2_model(orth_lambda=1.0)
    with torch.no_grad():
        for n, p in fresh.named_parameters():
            if ".orth_" in n:
                p.normal_()  # the checkpoint must replace these
    trainer2 = MedCareTrainer(model=fresh, args=args(tmp_path, max_steps=6, save_strategy="no"),
                              train_dataset=dataset(8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer2.train(resume_from_checkpoint=str(ckpt))
    assert trainer2.state.global_step == 6
    done, resumed = orth_state(model), orth_state(fresh)
    for n in done:
        torch.testing.assert_close(resumed[n], done[n], rtol=1e-4, atol=1e-5, msg=n)
    final = tmp_path / "final"
    trainer2.save_model(str(final))
    check = stage2_model(orth_lambda=1.0)
    load_adapter(check, final)
    assert all(torch.equal(adapter_params(check)[n], p) for n, p in adapter_params(fresh).items())


def test_stage1_aux_loss_trains_the_router_and_is_logged(tmp_path):
    def one_step(coef, out):
        model = apply_stage1(tiny_model("qwen2"), small_config(aux_loss_coef=coef))
        routers = {n: p.detach().clone() for n, p in model.named_parameters() if ".router." in n}
        trainer = train(model, out, dataset(8), max_steps=1, gradient_accumulation_steps=2,
                        per_device_train_batch_size=2)
        moved = any(not torch.equal(p, routers[n]) for n, p in model.named_parameters() if n in routers)
        return moved, [h for h in trainer.state.log_history if "loss" in h]

    # every routed B starts at zero, so in the first step only the aux loss can move the routers
    moved, logs = one_step(0.5, tmp_path / "a")
    assert moved
    assert len(logs) == 1 and logs[0]["router_aux_loss"] > 0
    moved, logs = one_step(0.0, tmp_path / "b")
    assert not moved and "router_aux_loss" in logs[0]  # logged even when it does not train


def test_extra_terms_are_off_in_evaluation_and_with_zero_coefficients(tmp_path):
    model = stage2_model(orth_lambda=0.0)
    data = dataset(4)
    trainer = MedCareTrainer(model=model, args=args(tmp_path, per_device_eval_batch_size=4), train_dataset=data,
                             eval_dataset=data)
    batch = trainer.data_collator(data)
    model.train()
    task = model(**batch).loss
    assert trainer.medcare_extra_loss() is None  # coefficient 0: logged only
    assert trainer._medcare_counts["orth_penalty"] == 1
    with_lambda = MedCareTrainer(model=model, args=args(tmp_path), train_dataset=data,
                                 medcare_config=small_config(orth_lambda=2.0))
    loss = with_lambda.compute_loss(model, dict(batch))
    from medcare import orthogonal_penalty

    expect = task + 2.0 * orthogonal_penalty(model)  # no GA in play: scale 1
    torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-5)
    model.eval()
    torch.testing.assert_close(with_lambda.compute_loss(model, dict(batch)), model(**batch).loss)


@pytest.mark.parametrize("accepts_loss_kwargs, accumulation", [(True, 1), (True, 2), (False, 2)])
def test_logged_loss_is_the_task_loss_and_the_penalty_is_logged_beside_it(tmp_path, accepts_loss_kwargs,
                                                                          accumulation):
    """The first logged step comes before any update: its loss is the same with and without the penalty."""
    import json

    kw = dict(per_device_train_batch_size=4 // accumulation, gradient_accumulation_steps=accumulation, max_steps=2,
              accepts_loss_kwargs=accepts_loss_kwargs)
    with_penalty = train(stage2_model(orth_lambda=50.0), tmp_path / "a", dataset(8), **kw)
    without = train(stage2_model(orth_lambda=0.0), tmp_path / "b", dataset(8), **kw)
    logged = [h for h in with_penalty.state.log_history if "loss" in h]
    plain = [h for h in without.state.log_history if "loss" in h]
    assert logged[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-5)
    assert logged[0]["orth_penalty"] == pytest.approx(plain[0]["orth_penalty"], rel=1e-5)
    assert 50.0 * logged[0]["orth_penalty"] > 10 * logged[0]["loss"]  # the penalty would dominate a total
    with_penalty.save_state()
    state = json.loads((tmp_path / "a" / "trainer_state.json").read_text())
    first = [h for h in state["log_history"] if "loss" in h][0]
    assert first["loss"] == pytest.approx(plain[0]["loss"], rel=1e-5) and "orth_penalty" in first


def test_resume_true_takes_the_newest_complete_checkpoint(tmp_path):
    from medcare.trainer import last_complete_checkpoint

    trainer = train(stage2_model(), tmp_path, dataset(8), max_steps=4, save_strategy="steps", save_steps=1)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4, "log_hi')  # cut mid-write
    os.remove(tmp_path / "checkpoint-3" / "trainer_state.json")  # killed before the state was written
    with open(tmp_path / "checkpoint-2" / ADAPTER_WEIGHTS_NAME, "r+b") as f:  # a torn adapter
        f.truncate(100)
    import json

    state_file = tmp_path / "checkpoint-1" / "trainer_state.json"  # mark the one that must be taken
    state = json.loads(state_file.read_text())
    state["log_history"][0]["marker"] = "checkpoint-1"
    state_file.write_text(json.dumps(state))
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint") as record:
        assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-1")
    assert len(record) == 3
    resumed = MedCareTrainer(model=stage2_model(), args=args(tmp_path, max_steps=4, save_strategy="no"),
                             train_dataset=dataset(8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4
    assert resumed.state.log_history[0].get("marker") == "checkpoint-1"  # it went on from there
    del trainer
