"""A wrapped model compiles whole (``torch.compile(fullgraph=True)``: one graph, no break) and gives the eager
losses and gradients; reentrant gradient checkpointing still trains the adapters (why the input-grad hook
exists); a stage-1 forward+backward replays in a CUDA graph (GPU)."""

from __future__ import annotations

import pytest
import torch

from medcare import apply_stage1, merge_lora, to_stage2
from tests.model.tiny import clone, enable_checkpointing, randomize_adapters, small_config, tiny_model, tokens

transformers = pytest.importorskip("transformers")

BERT_FFN = r"encoder\.layer\.\d+\.(intermediate|output)\.dense"


def tiny_bert(seed=0):
    """A 2-layer BERT encoder (random init), the architecture of all-MiniLM-L6-v2 at toy width."""
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def _wrapped(kind):
    if kind == "bert-stage1":
        model = apply_stage1(tiny_bert(), small_config(layers_pattern="layer", ffn_targets=BERT_FFN,
                                                       attn_targets=("query", "value")))
    else:
        model = apply_stage1(tiny_model("qwen2"), small_config())
        if kind == "qwen2-stage2":
            randomize_adapters(model)
            to_stage2(merge_lora(model, "attn"), small_config())
    randomize_adapters(model)
    return model.train()


def _loss(model, ids):
    out = model(input_ids=ids) if isinstance(model, transformers.BertModel) else model(input_ids=ids, labels=ids)
    loss = getattr(out, "loss", None)
    return out.last_hidden_state.square().mean() if loss is None else loss


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["qwen2-stage1", "qwen2-stage2", "bert-stage1"])
def test_a_wrapped_model_compiles_whole_and_matches_eager(kind):
    model = _wrapped(kind)
    eager = clone(model)
    ids = tokens(2, 10)
    explain = torch._dynamo.explain(_loss)(model, ids)
    assert (explain.graph_count, explain.graph_break_count) == (1, 0), explain.break_reasons
    compiled = torch.compile(_loss, fullgraph=True, backend="aot_eager")  # AOTAutograd: forward and backward
    loss = compiled(model, ids)
    loss.backward()
    ref = _loss(eager, ids)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    got, want = _grads(model), _grads(eager)
    assert got.keys() == want.keys() and len(got) > 0
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=n)
    assert any(g.abs().max() > 0 for g in got.values())


def test_reentrant_checkpointing_trains_the_adapters_without_transformers_hook():
    """transformers 4.x does not add its input-grad hook when checkpointing is enabled (5.x does, for input_ids
    models); with it removed, MedCare's own hook must make the checkpointed layers' adapters train."""
    model = _wrapped("qwen2-stage1")
    reference = clone(model)
    enable_checkpointing(model, use_reentrant=True)
    model.disable_input_require_grads()  # what a transformers without the automatic hook leaves
    ids = tokens(2, 10)
    _loss(model, ids).backward()
    _loss(reference, ids).backward()
    got, want = _grads(model), _grads(reference)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    assert got["model.layers.0.mlp.down_proj.lora_B"].abs().max() > 0


def test_the_input_grad_hook_acts_only_under_reentrant_checkpointing():
    model = _wrapped("qwen2-stage1")
    emb = model.get_input_embeddings()
    ids = tokens(2, 6)
    assert not emb(ids).requires_grad  # training, no checkpointing: nothing to do
    enable_checkpointing(model, use_reentrant=False)
    model.disable_input_require_grads()
    assert not emb(ids).requires_grad  # non-reentrant checkpointing needs no grad-requiring input
    enable_checkpointing(model, use_reentrant=True)
    model.disable_input_require_grads()
    assert emb(ids).requires_grad
    with torch.no_grad():
        assert not emb(ids).requires_grad
    model.eval()
    assert not emb(ids).requires_grad
    # under DeepSpeed ZeRO-3 (a partitioned embedding weight) it always acts: ZeRO-3's backward fetch needs it
    fresh = _wrapped("qwen2-stage1")
    emb = fresh.get_input_embeddings()
    emb.weight.ds_id, emb.weight.ds_shape = 0, emb.weight.shape
    assert emb(ids).requires_grad


@pytest.mark.gpu
def test_stage1_forward_backward_replays_in_a_cuda_graph():
    """Capture one stage-1 forward+backward of a tiny Qwen2 on the GPU, replay it on new tokens: the loss and
    every adapter gradient equal an eager step's (the ops never synchronise with the host)."""
    device = torch.device("cuda")
    model = _wrapped("qwen2-stage1").to(device)
    eager = clone(model)
    params = [p for p in model.parameters() if p.requires_grad]
    static_ids = tokens(2, 16).to(device)

    def step():
        return _loss(model, static_ids)

    side = torch.cuda.Stream()  # warm up off the default stream (autotuning, lazy init), as the docs prescribe
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for p in params:
                p.grad = None
            step().backward()
    torch.cuda.current_stream().wait_stream(side)
    for p in params:  # the graph accumulates into these buffers: they must exist before the capture
        p.grad = torch.zeros_like(p)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
        static_loss.backward()

    for seed in (1, 2):
        ids = tokens(2, 16, seed=seed).to(device)
        static_ids.copy_(ids)
        for p in params:
            p.grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        eager.zero_grad(set_to_none=True)
        ref = _loss(eager, ids)
        ref.backward()
        torch.testing.assert_close(static_loss, ref, rtol=1e-4, atol=1e-5)
        want = _grads(eager)
        got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-3, atol=1e-5, msg=n)
