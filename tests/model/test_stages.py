"""Both MedCare stages on tiny random Qwen2 / Qwen3 / Llama / Mistral models."""

from __future__ import annotations

import warnings

import pytest
import torch

from medcare import (
    LoRALinear,
    MoLoRALinear,
    OrthLoRALinear,
    apply_stage1,
    merge_and_unload,
    merge_lora,
    orthogonal_penalty,
    router_aux_loss,
    to_stage2,
)
from tests.model.tiny import (
    ARCHS,
    adapter_params,
    base_params,
    clone,
    enable_checkpointing,
    logits,
    randomize_adapters,
    small_config,
    tiny_model,
    tokens,
)

F32 = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fresh_wrap_is_the_base_model_and_every_target_is_wrapped(arch):
    model = tiny_model(arch)
    ids = tokens()
    ref = logits(model, ids)
    weight = model.model.layers[0].mlp.down_proj.weight
    apply_stage1(model, small_config())
    torch.testing.assert_close(logits(model, ids), ref, rtol=0, atol=1e-6)
    layer = model.model.layers[0]
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert isinstance(getattr(layer.mlp, name), MoLoRALinear)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert isinstance(getattr(layer.self_attn, name), LoRALinear)
    assert layer.mlp.down_proj.weight is weight  # shared, not copied
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, MoLoRALinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_params(model))
    # the state dict keeps the base names
    assert "model.layers.0.mlp.down_proj.weight" in model.state_dict()


def test_no_matching_target_lists_the_models_linear_names():
    model = tiny_model()
    with pytest.raises(ValueError) as e:
        apply_stage1(model, small_config(ffn_targets=("w1", "w2")))
    msg = str(e.value)
    assert "['w1', 'w2']" in msg and "model.layers.*.mlp.gate_proj" in msg and "lm_head" in msg
    assert not any(isinstance(m, MoLoRALinear) for m in model.modules())  # untouched
    with pytest.raises(ValueError, match="attn_targets"):
        apply_stage1(model, small_config(attn_targets=("q_proj", "query")))
    apply_stage1(model, small_config(ffn_targets=("mlp.up_proj",), attn_targets=()))
    assert isinstance(model.model.layers[1].mlp.up_proj, MoLoRALinear)
    assert type(model.model.layers[1].mlp.gate_proj) is torch.nn.Linear
    with pytest.raises(ValueError, match="already"):
        apply_stage1(model, small_config())


def _train(model, ids, steps, lr=1e-2, extra=None):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        out = model(input_ids=ids, labels=ids)
        loss = out.loss if extra is None else out.loss + extra(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(out.loss.item())
    model.eval()
    return losses


def test_stage1_training_lowers_the_loss_reaches_every_adapter_and_keeps_the_base():
    model = tiny_model("qwen2")
    apply_stage1(model, small_config(dropout=0.05, aux_loss_coef=0.01))
    before = base_params(model)
    ids = tokens(4, 16)
    losses = _train(model, ids, 12, extra=lambda m: 0.01 * router_aux_loss(m))
    assert losses[-1] < losses[0] - 0.05, losses
    after = base_params(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(p.grad is None for n, p in model.named_parameters() if n in before)

    # one more backward: every expert that received tokens, the routers, shared experts and attention LoRA
    model.train()
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss + router_aux_loss(model)
    loss.backward()
    for name, m in model.named_modules():
        if isinstance(m, MoLoRALinear):
            used = set(torch.topk(m.last_router_logits, m.top_k, dim=-1).indices.reshape(-1).tolist())
            for e in range(m.num_experts):
                has = m.lora_A.grad[e].abs().sum() > 0 and m.lora_B.grad[e].abs().sum() > 0
                assert has == (e in used), (name, e, used)
            assert m.router.weight.grad.abs().sum() > 0, name
            assert m.shared_A.grad.abs().sum() > 0 and m.shared_B.grad.abs().sum() > 0, name
        elif isinstance(m, LoRALinear):
            assert m.lora_A.grad.abs().sum() > 0 and m.lora_B.grad.abs().sum() > 0, name


@pytest.mark.parametrize("reentrant", [False, True])
def test_stage1_under_gradient_checkpointing_gives_the_same_gradients(reentrant):
    model = tiny_model("llama")
    apply_stage1(model, small_config())
    randomize_adapters(model)
    ids = tokens(2, 10)
    reference = clone(model)

    def grads(m, aux):
        m.train()
        m.zero_grad()
        loss = m(input_ids=ids, labels=ids).loss
        if aux:
            loss = loss + router_aux_loss(m)
        loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    enable_checkpointing(model, use_reentrant=reentrant)
    assert model.model.gradient_checkpointing
    expect = grads(reference, aux=not reentrant)
    if reentrant:  # the first forward runs without autograd: the LoRA still trains, the aux loss cannot
        got = grads(model, aux=False)
    else:
        got = grads(model, aux=True)
    for n in expect:
        torch.testing.assert_close(got[n], expect[n], rtol=1e-4, atol=1e-6, msg=n)


def test_stage1_generate_with_and_without_kv_cache_agree():
    model = tiny_model("qwen3")
    apply_stage1(model, small_config())
    randomize_adapters(model, 1.0)
    ids = tokens(2, 6)
    b = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    a = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    assert a.shape == (2, 12) and torch.equal(a, b)
    molora = next(m for m in model.modules() if isinstance(m, MoLoRALinear))
    assert molora.last_router_logits.shape[0] == 2  # one new token each


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_merges_and_stage2_give_the_expected_logits(arch):
    cfg = small_config()
    model = tiny_model(arch)
    apply_stage1(model, cfg)
    randomize_adapters(model)
    ids = tokens(2, 9)
    stage1 = logits(model, ids)

    merge_lora(model, "attn")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(model, ids), stage1, **F32)

    # reference: the stage-1 model with every routed expert's B set to zero (base + shared experts)
    no_routed = clone(model)
    with torch.no_grad():
        for m in no_routed.modules():
            if isinstance(m, MoLoRALinear):
                m.lora_B.zero_()
    to_stage2(model, cfg)
    assert not any(isinstance(m, MoLoRALinear) for m in model.modules())
    orth = [m for m in model.modules() if isinstance(m, OrthLoRALinear)]
    assert len(orth) == 3 * 2 and all(torch.all(m.orth_B == 0) for m in orth)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".orth_" in n}
    torch.testing.assert_close(logits(model, ids), logits(no_routed, ids), **F32)

    randomize_adapters(model)
    stage2 = logits(model, ids)
    merge_and_unload(model)
    assert not any(isinstance(m, (LoRALinear, OrthLoRALinear, MoLoRALinear)) for m in model.modules())
    assert not hasattr(model, "medcare_config")
    torch.testing.assert_close(logits(model, ids), stage2, **F32)


def test_merge_and_unload_refuses_routed_experts():
    model = apply_stage1(tiny_model(), small_config())
    with pytest.raises(ValueError, match="to_stage2"):
        merge_and_unload(model)


def _stage2_model(orth_lambda, freeze_base=True, seed=0):
    cfg = small_config(orth_lambda=orth_lambda, freeze_base=freeze_base)
    model = tiny_model("qwen2", seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        apply_stage1(model, cfg)
        randomize_adapters(model)
        return to_stage2(merge_lora(model, "attn"), cfg)


def test_stage2_penalty_has_a_real_gradient_and_training_lowers_it():
    ids = tokens(4, 12)
    with_penalty, without = _stage2_model(1.0), _stage2_model(0.0)
    base_before = {n: p.detach().clone() for n, p in with_penalty.named_parameters() if ".base_" in n}
    p0 = orthogonal_penalty(with_penalty).item()
    assert p0 > 0
    assert abs(orthogonal_penalty(without).item() - p0) < 1e-6 * p0  # same start

    # one step's gradient: the penalty contributes sign(A_base A_orth^T)^T A_base to every orth A
    def orth_grads(model, lam):
        model.train()
        model.zero_grad()
        (model(input_ids=ids, labels=ids).loss + lam * orthogonal_penalty(model)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if ".orth_A" in n}

    g1, g0 = orth_grads(with_penalty, 1.0), orth_grads(without, 0.0)
    for n, m in with_penalty.named_modules():
        if isinstance(m, OrthLoRALinear):
            s = torch.sign(m.base_A.detach() @ m.orth_A.detach().T)
            torch.testing.assert_close(g1[n + ".orth_A"] - g0[n + ".orth_A"], s.T @ m.base_A.detach(),
                                       rtol=1e-4, atol=1e-5)

    _train(with_penalty, ids, 10, extra=lambda m: 1.0 * orthogonal_penalty(m))
    _train(without, ids, 10)
    p1, p_free = orthogonal_penalty(with_penalty).item(), orthogonal_penalty(without).item()
    assert p1 < 0.9 * p0 and p1 < p_free, (p0, p1, p_free)
    for n, p in with_penalty.named_parameters():
        if ".base_" in n:
            assert torch.equal(p, base_before[n]) and p.grad is None, n


def test_stage2_base_trains_when_not_frozen():
    model = _stage2_model(1.0, freeze_base=False)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".base_" in n)
    ids = tokens(2, 8)
    model.train()
    (model(input_ids=ids, labels=ids).loss + orthogonal_penalty(model)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".base_A" in n)


def test_to_stage2_on_a_plain_model_warns_and_wraps_the_ffn_with_a_zero_base():
    model = tiny_model()
    ids = tokens()
    ref = logits(model, ids)
    with pytest.warns(UserWarning, match="load_adapter"):
        to_stage2(model, small_config())
    orth = [m for m in model.modules() if isinstance(m, OrthLoRALinear)]
    assert len(orth) == 6 and all(torch.all(m.base_A == 0) for m in orth)
    torch.testing.assert_close(logits(model, ids), ref, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="already in stage 2"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        to_stage2(model, small_config())
    with pytest.raises(ValueError, match="scale"):
        to_stage2(apply_stage1(tiny_model(), small_config()), small_config(alpha=32))


def test_penalty_pairs_are_collected_once():
    model = _stage2_model(1.0)
    from medcare.stages import wrapper_modules

    layers = wrapper_modules(model, OrthLoRALinear)
    assert wrapper_modules(model, OrthLoRALinear) is layers and len(layers) == 6
    expect = sum((m.base_A @ m.orth_A.T).abs().sum() for m in layers)
    torch.testing.assert_close(orthogonal_penalty(model), expect.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(orthogonal_penalty(list(layers)), expect.detach(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="to_stage2"):
        orthogonal_penalty(tiny_model())


def test_router_aux_loss_is_one_when_balanced_and_respects_the_mask():
    model = apply_stage1(tiny_model(), small_config(num_experts=4, top_k=2))
    with pytest.raises(ValueError, match="forward"):
        router_aux_loss(model)
    ids = tokens(2, 10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    model.train()
    model(input_ids=ids, attention_mask=mask)
    aux = router_aux_loss(model, mask)
    assert aux.dim() == 0 and 0 < aux.item() <= 4 and aux.requires_grad
    m = next(x for x in model.modules() if isinstance(x, MoLoRALinear))
    m.last_router_logits = torch.zeros(8, 4, requires_grad=True)  # uniform router: f_e = P_e = 1/4 -> 1
    torch.testing.assert_close(router_aux_loss([m]), torch.tensor(1.0))
    model.eval()
    model(input_ids=ids)
    assert not router_aux_loss(model).requires_grad  # eval mode keeps no graph
    with pytest.raises(ValueError, match="attention_mask"):
        router_aux_loss(model, torch.ones(3, 3))


def test_merge_and_unload_leaves_no_medcare_state_behind():
    model = to_stage2(merge_lora(apply_stage1(tiny_model(), small_config()), "attn"), small_config())
    merge_and_unload(model)
    assert not any(k.startswith("_medcare") or k == "medcare_config" for k in model.__dict__)
    out = model.model.embed_tokens(tokens())
    assert not out.requires_grad  # the input-grad hook that apply_stage1 added is gone
