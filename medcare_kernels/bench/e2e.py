"""End-to-end table: one stage-1 training step of a small Qwen2 (forward, backward, AdamW step).

The model is built from a config in code (random init, no downloads): by default 2 decoder layers at
Qwen2-0.5B widths (hidden 896, intermediate 4864, 14 heads / 2 KV heads) with a small vocabulary (2048)
so the embeddings and LM head do not dominate; batch 4 x 256 tokens; float32 on the CPU. Every method
gets its own copy of the same weights, and all copies train side by side, interleaved step by step
(:mod:`medcare_kernels.bench.interleave`; warm-up steps, which also allocate AdamW's state, excluded).

Methods, all with the input embeddings' output requiring grad (``model.enable_input_require_grads()``, as
``apply_stage1`` does) so every method's backward runs through the same layers:

* ``frozen``: nothing trains. The step is forward + backward through the whole network (activation
  gradients only, no weight gradient, no optimizer step): the floor every adapter method pays.
* ``plain LoRA (PEFT)``: ``peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05)`` on the same linears
  MedCare adapts (q, k, v, o, gate, up, down), when peft is installed.
* ``plain LoRA (medcare)``: this library's :class:`medcare.LoRALinear` (``mk.lora_linear``) on the same
  linears, same r/alpha/dropout: the plain LoRA when peft is missing, and the cost of the op itself.
* ``medcare stage 1``: :func:`medcare.apply_stage1` with the default :class:`medcare.MedCareConfig`
  (E=8, r=16, top-2, 2 shared experts, attention LoRA, ``backend="auto"``).
* ``authors' dense MoLoRA``: the same with ``MedCareConfig(backend="reference")``: every expert for every
  token, as the published code computes it.

Peak memory is what one training step allocates beyond what was live before it (parameters, gradients
of the previous step freed with ``zero_grad(set_to_none=True)``, the optimizer state already allocated
in warm-up): on a GPU ``torch.cuda.max_memory_allocated``; on the CPU the peak of live bytes from the
profiler's allocation events (torch's CPU allocator; ``tracemalloc`` does not see it, and an RSS delta
moves with the allocator's caching and other threads).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from medcare_kernels.bench import interleave, measure, sanity

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FROZEN = "frozen"
PEFT = "plain LoRA (PEFT)"
OWN_LORA = "plain LoRA (medcare)"
STAGE1 = "medcare stage 1"
DENSE = "authors' dense MoLoRA"
ALL_METHODS = (FROZEN, PEFT, OWN_LORA, STAGE1, DENSE)


@dataclass(frozen=True)
class ModelSize:
    """A small Qwen2 (defaults: 2 layers at Qwen2-0.5B widths, vocabulary 2048) and the batch."""

    layers: int = 2
    hidden: int = 896
    intermediate: int = 4864
    heads: int = 14
    kv_heads: int = 2
    vocab: int = 2048
    batch: int = 4
    seq: int = 256

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


@dataclass
class E2ERow:
    method: str
    ms_per_step: float
    tokens_per_s: float
    x_frozen: float  # median of per-round ratios to the frozen step
    x_plain_lora: float | None  # ... to the plain LoRA step (PEFT when installed)
    peak_mib: float  # allocated during one step beyond what was live before
    trainable_m: float  # trainable parameters, millions
    flags: list[str] = field(default_factory=list)


def build_model(size: ModelSize, dtype: torch.dtype, device: str, seed: int = 0):
    """A Qwen2ForCausalLM from a config (random init, deterministic in ``seed``)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if size.hidden % size.heads or size.heads % size.kv_heads:
        raise ValueError(f"hidden ({size.hidden}) must be a multiple of heads ({size.heads}), and heads of kv_heads "
                         f"({size.kv_heads})")
    config = Qwen2Config(vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
                         num_hidden_layers=size.layers, num_attention_heads=size.heads,
                         num_key_value_heads=size.kv_heads, max_position_embeddings=max(512, size.seq),
                         tie_word_embeddings=True, use_cache=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model.to(device=device, dtype=dtype)


def _own_lora(model):
    """This library's LoRALinear (r=16, alpha=32, dropout 0.05) on every TARGETS linear, all else frozen."""
    import medcare

    cfg = medcare.MedCareConfig()
    for p in model.parameters():
        p.requires_grad_(False)
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and ".layers." in n and n.rsplit(".", 1)[-1] in TARGETS]
    for name, linear in found:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, medcare.LoRALinear.from_linear(linear, cfg))
    return model


def _peft_lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=list(TARGETS)))


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def prepare(method: str, model):
    """``model`` (a fresh copy) set up for ``method``; returns the model to train."""
    import medcare

    if method == FROZEN:
        for p in model.parameters():
            p.requires_grad_(False)
    elif method == PEFT:
        model = _peft_lora(model)
    elif method == OWN_LORA:
        model = _own_lora(model)
    elif method == STAGE1:
        model = medcare.apply_stage1(model, medcare.MedCareConfig())
    elif method == DENSE:
        model = medcare.apply_stage1(model, medcare.MedCareConfig(backend="reference"))
    else:
        raise ValueError(f"unknown end-to-end method {method!r}; known: {ALL_METHODS}")
    model.enable_input_require_grads()  # idempotent for apply_stage1, which installs the same hook
    model.train()
    return model


def make_step(model, input_ids: torch.Tensor) -> Callable[[], float]:
    """One training step: loss forward, backward, AdamW step, gradients freed (no step when nothing trains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step():
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss
    return step


def methods(wanted: tuple[str, ...] | None = None) -> list[str]:
    """The methods to run, in table order; PEFT only when installed."""
    out = [m for m in ALL_METHODS if wanted is None or m in wanted]
    unknown = sorted(set(wanted or ()) - set(ALL_METHODS))
    if unknown:
        raise ValueError(f"unknown end-to-end methods {unknown}; known: {list(ALL_METHODS)}")
    return [m for m in out if m != PEFT or peft_available()]


def run(size: ModelSize = ModelSize(), device: str = "cpu", dtype: torch.dtype = torch.float32, *, rounds: int = 5,
        warmup: int = 2, wanted: tuple[str, ...] | None = None, memory: bool = True,
        progress: Callable[[str], None] | None = None) -> list[E2ERow]:
    """Train every method's copy step by step, interleaved; one row per method."""
    todo = methods(wanted)
    if FROZEN not in todo:
        todo.insert(0, FROZEN)
    base = build_model(size, dtype, device)
    g = torch.Generator(device="cpu").manual_seed(1)
    input_ids = torch.randint(0, size.vocab, (size.batch, size.seq), generator=g).to(device)
    models, steps, trainable = {}, {}, {}
    for m in todo:
        models[m] = prepare(m, copy.deepcopy(base))
        steps[m] = make_step(models[m], input_ids)
        trainable[m] = sum(p.numel() for p in models[m].parameters() if p.requires_grad) / 1e6
    del base
    say = progress or (lambda s: None)
    say(f"timing {len(todo)} methods, {warmup} warm-up + {rounds} interleaved steps each")
    t = interleave.measure([interleave.Candidate(m, steps[m]) for m in todo], rounds=rounds, warmup=warmup,
                           device=device)
    peaks = {m: (measure.peak_bytes(steps[m], device) / 2**20 if memory else float("nan")) for m in todo}
    lora = PEFT if PEFT in todo else OWN_LORA if OWN_LORA in todo else None
    rows = []
    for m in todo:
        ms = t.median(m) * 1e3
        spread = t.spread(m, FROZEN)
        rows.append(E2ERow(m, ms, size.tokens / (ms / 1e3), t.ratio(m, FROZEN), t.ratio(m, lora) if lora else None,
                           peaks[m], trainable[m], sanity.row_flags(fwd_s=0.0, fwd_bwd_s=ms, spread=spread)))
    return rows


#: Issue 14's end-to-end targets on the CPU: stage 1 <= 1.15x a plain LoRA step, >= 2x faster than dense.
TARGET_X_LORA = 1.15
TARGET_X_DENSE = 2.0


def targets(rows: list[E2ERow]) -> list[str]:
    by = {r.method: r for r in rows}
    out = []
    s1 = by.get(STAGE1)
    if s1 is not None and s1.x_plain_lora is not None:
        lora = PEFT if PEFT in by else OWN_LORA
        out.append(f"{STAGE1}: {s1.x_plain_lora:.2f}x the {lora} step (target <= {TARGET_X_LORA}x: "
                   f"{'met' if s1.x_plain_lora <= TARGET_X_LORA else 'not met'})")
    if s1 is not None and DENSE in by:
        speedup = by[DENSE].x_frozen / s1.x_frozen
        out.append(f"{STAGE1}: {speedup:.2f}x faster than the {DENSE} (target >= {TARGET_X_DENSE}x: "
                   f"{'met' if speedup >= TARGET_X_DENSE else 'not met'})")
    return out


def table(rows: list[E2ERow]) -> str:
    lines = ["| method | ms/step | tokens/s | x frozen | x plain LoRA | peak MiB (step) | trainable M | flags |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        xl = "-" if r.x_plain_lora is None else f"{r.x_plain_lora:.3f}"
        lines.append(f"| {r.method} | {r.ms_per_step:.1f} | {r.tokens_per_s:.0f} | {r.x_frozen:.3f} | {xl} | "
                     f"{r.peak_mib:.1f} | {r.trainable_m:.2f} | {'; '.join(r.flags) or '-'} |")
    return "\n".join(lines)


def header(size: ModelSize, device: str, dtype: torch.dtype, rounds: int, warmup: int) -> str:
    return (f"End to end: one stage-1 training step (forward, backward, AdamW) of a Qwen2 with {size.layers} layers, "
            f"hidden {size.hidden}, intermediate {size.intermediate}, {size.heads}/{size.kv_heads} heads, vocabulary "
            f"{size.vocab}; batch {size.batch} x {size.seq} tokens; {str(dtype).replace('torch.', '')} on {device}. "
            f"{warmup} warm-up steps excluded, then {rounds} steps per method interleaved round by round in one "
            "process; times are medians, ratios medians of per-round ratios.")


def to_json(rows: list[E2ERow]) -> list[dict]:
    return [asdict(r) for r in rows]


__all__ = ["ALL_METHODS", "DENSE", "FROZEN", "E2ERow", "ModelSize", "OWN_LORA", "PEFT", "STAGE1", "build_model",
           "header", "make_step", "methods", "prepare", "run", "table", "targets"]
