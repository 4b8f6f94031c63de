"""Which linears each target group wraps, on the real all-MiniLM-L6-v2 (BERT) weights and tiny decoders:
suffix collisions, modules in both groups, full-name regular expressions, and the no-match report."""

from __future__ import annotations

import pytest
import torch

from medcare import LoRALinear, MedCareConfig, MoLoRALinear, OrthLoRALinear, apply_stage1, load_adapter, save_adapter
from medcare.stages import TargetError
from tests.model.real import minilm
from tests.model.tiny import quiet_to_stage2, randomize_adapters, small_config, tiny_model

BERT_FFN_REGEX = r"encoder\.layer\.\d+\.(intermediate|output)\.dense"
BERT_ATTN = ("query", "key", "value", "attention.output.dense")


def _kinds(model):
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (MoLoRALinear, LoRALinear, OrthLoRALinear)):
            out[name] = type(m).__name__
    return out


def _untouched(model):
    return not _kinds(model) and all(p.requires_grad for p in model.parameters())


def _ids(n=2, seq=9):
    return torch.randint(1000, 5000, (n, seq))


def test_a_suffix_that_matches_two_places_per_layer_is_an_error(monkeypatch):
    model = minilm(monkeypatch)
    cfg = small_config(layers_pattern="layer", ffn_targets=("intermediate.dense", "output.dense"),
                       attn_targets=("query", "key", "value"))
    with pytest.raises(TargetError) as e:
        apply_stage1(model, cfg)
    msg = str(e.value)
    assert "'output.dense' matches linears at 2 places in each layer" in msg
    assert "'attention.output.dense' (6)" in msg and "'output.dense' (6)" in msg
    assert _untouched(model)


@pytest.mark.parametrize("ffn, attn", [
    (("intermediate.dense", "output.dense"), ("query", "attention.output.dense")),  # the pair
    (r".*\.(intermediate|output)\.dense", ("attention.output.dense",)),            # a regex against a suffix
])
def test_a_module_matched_by_both_groups_is_an_error_naming_it(monkeypatch, ffn, attn):
    model = minilm(monkeypatch)
    with pytest.raises(TargetError) as e:
        apply_stage1(model, small_config(layers_pattern="layer", ffn_targets=ffn, attn_targets=attn))
    msg = str(e.value)
    assert "'encoder.layer.0.attention.output.dense'" in msg and "and 3 more" in msg
    assert "selected by both MedCareConfig.ffn_targets and MedCareConfig.attn_targets" in msg
    assert _untouched(model)


def test_the_longest_suffix_claims_a_module_within_a_group(monkeypatch):
    model = minilm(monkeypatch)
    apply_stage1(model, small_config(layers_pattern="layer", ffn_targets=("intermediate.dense",),
                                     attn_targets=("query", "output.dense", "attention.output.dense")))
    kinds = _kinds(model)
    assert sum(k == "LoRALinear" for k in kinds.values()) == 18 and len(kinds) == 24


def test_a_regex_selects_bert_ffn_and_stage2_rebuilds_in_a_fresh_process(monkeypatch, tmp_path):
    model = minilm(monkeypatch)
    ids = _ids()
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
    cfg = small_config(layers_pattern="layer", ffn_targets=BERT_FFN_REGEX, attn_targets=BERT_ATTN)
    apply_stage1(model, cfg)
    kinds = _kinds(model)
    assert sorted(n for n, k in kinds.items() if k == "MoLoRALinear") == sorted(
        f"encoder.layer.{i}.{p}.dense" for i in range(6) for p in ("intermediate", "output"))
    assert sum(k == "LoRALinear" for k in kinds.values()) == 24
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, ref, rtol=0, atol=1e-5)
    randomize_adapters(model)
    save_adapter(model, tmp_path / "s1")

    # the failure: to_stage2 on a plain model, then load_adapter, must fit (no 'lora' vs OrthLoRA clash)
    fresh = minilm(monkeypatch)
    quiet_to_stage2(fresh, MedCareConfig.from_dict(cfg.to_dict()))
    load_adapter(fresh, tmp_path / "s1")
    assert sum(isinstance(m, OrthLoRALinear) for m in fresh.modules()) == 12
    in_process = quiet_to_stage2(model, cfg)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).last_hidden_state,
                                   in_process(input_ids=ids).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_no_match_on_an_encoder_reports_every_group_and_the_layer_list(monkeypatch):
    model = minilm(monkeypatch)
    with pytest.raises(TargetError) as e:
        apply_stage1(model, MedCareConfig())  # the decoder defaults on a BERT encoder
    msg = str(e.value)
    assert "decoder" not in msg
    assert "MedCareConfig.ffn_targets: ['gate_proj', 'up_proj', 'down_proj'] match no nn.Linear" in msg
    assert "MedCareConfig.attn_targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj'] match no nn.Linear" in msg
    assert "set MedCareConfig.layers_pattern to 'layer'" in msg and "encoder.layer.*.output.dense" in msg
    assert [f for f, _ in e.value.problems] == ["ffn_targets", "attn_targets"]
    assert "--ffn_targets" in e.value.render(lambda f: f"--{f}")
    assert _untouched(model)


@pytest.mark.parametrize("spec", ["gate_proj", r"model\.layers\.\d+\.mlp\.nothing"])
def test_a_regex_that_matches_nothing_is_reported_with_the_others(spec):
    model = tiny_model()
    with pytest.raises(TargetError) as e:
        apply_stage1(model, small_config(ffn_targets=spec, attn_targets=("q_proj", "w_nothing")))
    msg = str(e.value)
    assert f"the regular expression {spec!r} fully matches no nn.Linear's name" in msg
    assert "MedCareConfig.attn_targets: ['w_nothing'] match no nn.Linear" in msg
    assert "layers_pattern" not in msg  # the decoder's layer list is found: no hint about it
    assert _untouched(model)


@pytest.mark.parametrize("spec, wrapped", [
    (r"model\.layers\.\d+\.mlp\.(gate|up)_proj", {"gate_proj", "up_proj"}),
    (r".*down_proj", {"down_proj"}),
    (("gate_proj",), {"gate_proj"}),  # lists stay suffixes, as before
])
def test_regex_is_a_full_match_on_the_full_name_and_lists_are_suffixes(spec, wrapped):
    model = tiny_model()
    apply_stage1(model, small_config(ffn_targets=spec, attn_targets=()))
    got = {n.rsplit(".", 1)[1] for n, k in _kinds(model).items() if k == "MoLoRALinear"}
    assert got == wrapped
    assert not any(isinstance(m, MoLoRALinear) for m in [model.lm_head])


def test_config_accepts_a_regex_string_and_round_trips_it():
    cfg = MedCareConfig(ffn_targets=BERT_FFN_REGEX, attn_targets=BERT_ATTN)
    assert cfg.ffn_targets == BERT_FFN_REGEX
    assert MedCareConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"ffn_targets is a string, i\.e\. a regular expression .* does not compile"):
        MedCareConfig(ffn_targets="mlp.(gate")
    with pytest.raises(ValueError, match="disjoint"):
        MedCareConfig(ffn_targets=".*proj", attn_targets=".*proj")
    with pytest.raises(TypeError, match="or a str"):
        MedCareConfig(ffn_targets=3)
