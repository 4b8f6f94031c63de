"""Routing statistics: loads sum to 1 per linear and equal a direct count from the router logits of each
record run alone (no padding); entropies likewise; per-group counts add up to the whole."""

from __future__ import annotations

import math

import pytest
import torch

from medcare import apply_stage1
from medcare.data.dataset import tokenize_messages
from medcare.eval import load_eval_items
from medcare.eval.experts import plot_expert_heatmap, routing_statistics
from medcare.eval.prompts import full_messages
from medcare.modules import MoLoRALinear
from tests.model.tiny import randomize_adapters, small_config


@pytest.fixture(scope="module")
def stage1(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    apply_stage1(model, small_config(num_experts=6, top_k=2))
    randomize_adapters(model, scale=1.0)
    with torch.no_grad():  # routers far from uniform, logits of a few units (no float32 underflow of the softmax)
        for m in model.modules():
            if isinstance(m, MoLoRALinear):
                m.router.weight.mul_(4.0 / m.router.weight.norm(dim=1, keepdim=True).mean())
    return model.eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def _direct(model, tokenizer, items):
    """Per linear: top-k counts and summed entropy from x @ W_r.T + b_r, one record at a time."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MoLoRALinear)}
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.__setitem__(n, args[0].detach()))
             for n, m in layers.items()]
    counts = {n: torch.zeros(m.num_experts, dtype=torch.long) for n, m in layers.items()}
    entropy = dict.fromkeys(layers, 0.0)
    tokens = 0
    try:
        with torch.no_grad():
            for it in items:
                ids = tokenize_messages(full_messages(it), tokenizer)["input_ids"]
                model(input_ids=torch.tensor([ids]))
                tokens += len(ids)
                for n, m in layers.items():
                    x = inputs[n].reshape(-1, m.in_features).double()
                    logits = x @ m.router.weight.double().T + m.router.bias.double()
                    p = torch.softmax(logits, -1)
                    counts[n] += torch.bincount(logits.topk(m.top_k, -1).indices.reshape(-1), minlength=m.num_experts)
                    entropy[n] += float(-(p * p.log()).sum())
    finally:
        for h in hooks:
            h.remove()
    return counts, entropy, tokens


def test_loads_sum_to_one_and_match_a_direct_count(stage1, tmp_path):
    from medcare.cli.demo import DATA_FILES, HELD_OUT_MC, data_file

    model, tok = stage1
    items = load_eval_items(data_file(HELD_OUT_MC), limit=10) + load_eval_items(data_file(DATA_FILES["held_out"]))
    stats = routing_statistics(model, tok, items, batch_size=4, progress=False)
    counts, entropy, tokens = _direct(model, tok, items)
    assert stats["tokens"] == tokens and stats["items"] == len(items)
    assert set(stats["layers"]) == set(counts) and len(counts) == 2 * 3
    for name, layer in stats["layers"].items():
        assert sum(layer["load"]) == pytest.approx(1.0)
        assert layer["choices"] == tokens * layer["top_k"]
        assert layer["load"] == pytest.approx((counts[name].double() / counts[name].sum()).tolist(), abs=1e-12)
        assert layer["router_entropy"] == pytest.approx(entropy[name] / tokens, rel=1e-5)
        assert 0 < layer["router_entropy_normalized"] <= 1
        assert layer["max_over_mean"] == pytest.approx(max(layer["load"]) * 6)
    assert max(layer["max_over_mean"] for layer in stats["layers"].values()) > 1.2  # a count that can be wrong
    assert plot_expert_heatmap(stats, tmp_path / "load.png").stat().st_size > 1000


def test_groups_by_a_record_field_add_up_to_the_whole(stage1, tmp_path):
    from medcare.cli.demo import HELD_OUT_MC, data_file

    model, tok = stage1
    items = load_eval_items(data_file(HELD_OUT_MC), limit=16)
    stats = routing_statistics(model, tok, items, by="subject", batch_size=5, progress=False)
    groups = stats["groups"]
    assert set(groups) == {it.subject for it in items}
    assert sum(g["items"] for g in groups.values()) == 16
    assert sum(g["tokens"] for g in groups.values()) == stats["tokens"]
    for name, layer in stats["layers"].items():
        total = sum(torch.tensor(g["layers"][name]["load"]) * g["layers"][name]["choices"] for g in groups.values())
        assert torch.allclose(total, torch.tensor(layer["load"]) * layer["choices"], atol=1e-6)
        mean_h = sum(g["layers"][name]["router_entropy"] * g["tokens"] for g in groups.values()) / stats["tokens"]
        assert mean_h == pytest.approx(layer["router_entropy"], rel=1e-9)
    one = next(iter(groups))  # a group alone equals the statistics of its records alone
    alone = routing_statistics(model, tok, [it for it in items if it.subject == one], progress=False)
    for name in stats["layers"]:
        assert groups[one]["layers"][name]["load"] == pytest.approx(alone["layers"][name]["load"], abs=1e-12)
    assert plot_expert_heatmap(stats, tmp_path / "by.png").stat().st_size > 1000
    assert not math.isnan(stats["layers"][name]["router_entropy"])


def test_a_model_without_routed_experts_is_refused(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with pytest.raises(ValueError, match="stage-1 model"):
        routing_statistics(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           AutoTokenizer.from_pretrained(tiny_model_dir), [], progress=False)
