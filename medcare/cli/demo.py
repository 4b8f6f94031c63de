"""``medcare demo [--output DIR] [--seed N] [--quick]``: both MedCare stages end to end, with no downloads.

1. Builds a byte-level BPE tokenizer (``tokenizers``) from the embedded medical data (``medcare/data``)
   with a ChatML chat template, and a tiny Qwen2 model from a config (random init, a few million
   parameters); saves both under ``DIR/base-model``.
2. Stage 1 (knowledge aggregation) on the knowledge records with :class:`~medcare.MedCareTrainer`: every FFN
   linear a MoLoRA layer (the paper's E=8 experts of rank 16, top-2, 2 shared), attention LoRA.
3. Merges the attention LoRA, builds stage 2 (the shared experts become the frozen base LoRA) and trains the
   orthogonal LoRA on the structured triage notes with the orthogonality penalty (lambda=1).
4. ``merge_and_unload``: a plain transformers checkpoint in ``DIR/final-model``, reloaded with plain
   transformers to answer a held-out question and write a held-out triage note.

Prints and writes (``DIR/summary.md``, ``DIR/summary.json``) a summary table: task losses before and after
each stage, the penalty before and after stage 2, the expert load per layer, tokens/s, the backend used;
plots the loss curves and the expert load (``DIR/loss_curves.png``, ``DIR/expert_load.png``). Deterministic
for a given ``--seed`` on one machine and thread count.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from medcare.cli._common import CLIError, write_dir_atomically

__all__ = ["SIZES", "DemoSize", "build_model", "build_tokenizer", "data_file", "main", "run_demo"]

#: ChatML, as Qwen2 chat models use it; the demo tokenizer carries it, so the chat-template path is exercised.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
#: Qwen2's pre-tokenisation pattern (contractions, letters, single digits, punctuation, newlines, spaces).
_QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
                r"""|\s+(?!\S)|\s+""")
DATA_FILES = {"stage1": "stage1_knowledge.jsonl", "stage2": "stage2_triage.jsonl", "held_out": "held_out.jsonl"}


@dataclass(frozen=True)
class DemoSize:
    """Model and schedule of one demo size (``full`` by default, ``quick`` for smoke tests)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    stage1_steps: int
    stage2_steps: int
    stage1_lr: float
    stage2_lr: float
    batch_size: int = 16
    max_new_tokens: int = 64


SIZES = {
    # ~3.4M parameters (1.3M frozen base + embeddings, 2M adapter in stage 1)
    "full": DemoSize(hidden_size=256, intermediate_size=688, num_layers=4, vocab_size=2048,
                     stage1_steps=150, stage2_steps=100, stage1_lr=5e-3, stage2_lr=6e-3),
    "quick": DemoSize(hidden_size=64, intermediate_size=160, num_layers=2, vocab_size=1024,
                      stage1_steps=24, stage2_steps=12, stage1_lr=1e-2, stage2_lr=1e-2, batch_size=8,
                      max_new_tokens=24),
}


def data_file(name: str) -> Path:
    """Path of an embedded data file (``stage1_knowledge.jsonl``, ``stage2_triage.jsonl``, ``held_out.jsonl``)."""
    path = Path(str(resources.files("medcare.data").joinpath(name)))
    if not path.is_file():
        raise CLIError(f"the embedded demo data {name} is missing from the installation ({path})")
    return path


# ---- tokenizer and model ------------------------------------------------------------------------------

def build_tokenizer(examples: Sequence[Any], vocab_size: int = 2048) -> Any:
    """A byte-level BPE tokenizer trained on the examples' text, as a ``PreTrainedTokenizerFast`` with ChatML.

    Built like Qwen2's (NFC, Qwen2's split pattern, byte level, so nothing is unknown): transformers 5 loads a
    tokenizer saved next to a Qwen2 config as ``Qwen2Tokenizer``, which rebuilds that pipeline, so a saved
    and reloaded tokenizer encodes exactly as this one. EOS is ``<|im_end|>`` (end of a turn), PAD
    ``<|endoftext|>``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [f"{m['role']}\n{m['content']}" for ex in examples for m in ex.messages]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"],
                                   model_input_names=["input_ids", "attention_mask"])
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


def build_model(tokenizer: Any, size: DemoSize, seed: int) -> Any:
    """A Qwen2 causal LM from a config, random init (deterministic in ``seed``), float32.

    ``initializer_range=0.1`` (Qwen2's default is 0.02): the embeddings, tied to the LM head, stay frozen in
    both stages, and with 0.02 a unit-RMS hidden state reaches logits of only about +-5, which caps what
    the adapters can learn on a random model.
    """
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=size.hidden_size, intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, initializer_range=0.1, tie_word_embeddings=True, use_cache=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


# ---- measurements -------------------------------------------------------------------------------------

def evaluate(model: Any, dataset: Any, collator: Any, batch_size: int = 32,
             expert_load: bool = False) -> tuple[float, dict[str, list[float]] | None]:
    """Mean loss per response token over ``dataset`` (eval mode, no dropout) and, with ``expert_load``, the
    fraction of the top-k choices each routed expert received per MoLoRA layer (padding excluded)."""
    import torch

    import medcare_kernels as mk
    from medcare.modules import MoLoRALinear

    device = next(model.parameters()).device
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MoLoRALinear)] if expert_load else []
    counts = {n: torch.zeros(m.num_experts, dtype=torch.float64) for n, m in layers}
    was_training = model.training
    model.eval()
    total, n_tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(dataset), batch_size):
            batch = collator([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                     ignore_index=-100, reduction="sum")
            total += float(loss)
            n_tokens += int((labels != -100).sum())
            mask = batch["attention_mask"].reshape(-1).bool()
            for n, m in layers:
                _, idx = mk.route(m.last_router_logits[mask], m.top_k, backend=m.backend)
                counts[n] += torch.bincount(idx.reshape(-1).cpu(), minlength=m.num_experts).double()
    model.train(was_training)
    load = {n: (c / c.sum()).tolist() for n, c in counts.items()} if expert_load else None
    return total / max(n_tokens, 1), load


class _TokenCounter:
    """Wraps a collator and counts the real (non-padding) tokens of the batches it makes."""

    def __init__(self, collator: Any):
        self.collator = collator
        self.tokens = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(features)
        self.tokens += int(batch["attention_mask"].sum())
        return batch


@contextlib.contextmanager
def recording_backends() -> Iterator[dict[str, set[str]]]:
    """Records which backend each ``medcare_kernels`` op resolved to while the block runs."""
    used: dict[str, set[str]] = {}
    patched = []
    for op in ("molora_linear", "lora_linear", "orthogonal_penalty", "route"):
        try:
            mod = importlib.import_module(f"medcare_kernels.ops.{op}")
        except ImportError:
            continue
        original = getattr(mod, "resolve_backend", None)
        if original is None:
            continue

        def wrapper(*args: Any, _original: Any = original, _op: str = op, **kwargs: Any) -> str:
            backend = _original(*args, **kwargs)
            used.setdefault(_op, set()).add(backend)
            return backend

        mod.resolve_backend = wrapper
        patched.append((mod, original))
    try:
        yield used
    finally:
        for mod, original in patched:
            mod.resolve_backend = original


def generate(model: Any, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    """Greedy reply of ``model`` to ``messages`` (ending with a user turn), special tokens stripped."""
    import torch

    from medcare.data.dataset import prompt_text

    device = next(model.parameters()).device
    enc = tokenizer(prompt_text(messages, tokenizer), return_tensors="pt", add_special_tokens=False)
    enc = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.train(was_training)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


# ---- training -----------------------------------------------------------------------------------------

def _progress_callback(label: str) -> Any:
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class StageProgress(TrainerCallback):
        """One progress bar per stage with the last logged loss (and penalty) as postfix."""

        def __init__(self) -> None:
            self.bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, desc=label, unit="step", dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and self.bar is not None:
                post = {"loss": f"{logs['loss']:.3f}"}
                if "orth_penalty" in logs:
                    post["penalty"] = f"{logs['orth_penalty']:.3g}"
                self.bar.set_postfix(post, refresh=False)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()

    return StageProgress()


def _train_stage(model: Any, tokenizer: Any, dataset: Any, collator: Any, output_dir: Path, label: str,
                 steps: int, lr: float, size: DemoSize, seed: int, device: str) -> dict[str, Any]:
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from medcare import MedCareTrainer

    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=size.batch_size, learning_rate=lr,
        max_steps=steps, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 12), weight_decay=0.0,
        logging_steps=max(1, steps // 24), save_strategy="no", report_to="none", seed=seed, data_seed=seed,
        use_cpu=(device == "cpu"), dataloader_num_workers=0, disable_tqdm=True)
    counter = _TokenCounter(collator)
    trainer = MedCareTrainer(model=model, args=args, train_dataset=dataset, data_collator=counter,
                             processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_progress_callback(label))
    result = trainer.train()
    trainer.save_model()  # the adapter (+ tokenizer, training arguments) in output_dir
    runtime = float(result.metrics.get("train_runtime") or 0.0)
    history = [{k: v for k, v in h.items() if k in ("step", "loss", "orth_penalty", "router_aux_loss")}
               for h in trainer.state.log_history if "loss" in h]
    return {"steps": int(trainer.state.global_step), "runtime_s": runtime, "tokens": counter.tokens,
            "tokens_per_s": counter.tokens / runtime if runtime > 0 else float("nan"), "history": history}


# ---- the demo -----------------------------------------------------------------------------------------

def run_demo(output: str | os.PathLike = "medcare-demo", seed: int = 0, size: str = "full",
             device: str | None = None, threads: int | None = None, stage1_steps: int | None = None,
             stage2_steps: int | None = None, plots: bool = True) -> dict[str, Any]:
    """Run the demo; returns the summary (also written to ``output``)."""
    import torch
    import transformers

    wall0 = time.perf_counter()
    spec = SIZES[size]
    steps1 = spec.stage1_steps if stage1_steps is None else stage1_steps
    steps2 = spec.stage2_steps if stage2_steps is None else stage2_steps
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: no CUDA device is visible to torch")
    if device == "cpu" or threads:
        # one thread by default: the demo's matrices are small, and on a shared or busy machine OpenMP threads
        # that wait for each other slow a step down several times over
        torch.set_num_threads(threads or 1)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    transformers.set_seed(seed)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # weight loading/saving bars; the stages have their own
    try:
        summary = _run(out, seed, size, spec, steps1, steps2, device, plots, wall0)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return summary


def _run(out: Path, seed: int, size: str, spec: DemoSize, steps1: int, steps2: int, device: str, plots: bool,
         wall0: float) -> dict[str, Any]:
    import torch
    import transformers

    from medcare import MedCareConfig, apply_stage1, merge_and_unload, merge_lora, orthogonal_penalty, to_stage2
    from medcare.data.dataset import build_dataset, make_collator
    from medcare.data.formats import load_records

    say = _say

    # data, tokenizer, model
    ex1 = load_records(data_file(DATA_FILES["stage1"]))
    ex2 = load_records(data_file(DATA_FILES["stage2"]))
    held = load_records(data_file(DATA_FILES["held_out"]))
    tokenizer = build_tokenizer(ex1 + ex2, spec.vocab_size)
    ds1 = build_dataset(ex1, tokenizer, max_length=256)
    ds2 = build_dataset(ex2, tokenizer, max_length=256)
    collator = make_collator(tokenizer)
    model = build_model(tokenizer, spec, seed)
    n_params = sum(p.numel() for p in model.parameters())
    base_dir = out / "base-model"
    write_dir_atomically(base_dir, lambda d: (model.save_pretrained(d), tokenizer.save_pretrained(d)),
                         overwrite=True, what="base model")
    model.to(device)
    say(f"tokenizer: byte-level BPE, {len(tokenizer)} tokens; model: Qwen2, {spec.num_layers} layers, hidden "
        f"{spec.hidden_size}, {n_params / 1e6:.2f}M parameters (random init, seed {seed}); device {device}, "
        f"{torch.get_num_threads()} CPU threads")
    say(f"stage-1 data: {len(ds1)} knowledge records ({ds1.num_tokens} tokens); stage-2 data: {len(ds2)} "
        f"triage notes ({ds2.num_tokens} tokens)")

    cfg = MedCareConfig(r=16, alpha=32, num_experts=8, top_k=2, num_shared=2, orth_lambda=1.0)
    probes = {  # what the model answers after stage 1 and at the end (greedy)
        "seen": ex1[0],  # a stage-1 training question: recall, and whether stage 2 keeps it
        "held_out": held[0],  # a knowledge fact of the training data, asked in new words
    }
    q_triage = held[1].messages[:-1]
    with recording_backends() as backends:
        # stage 1: knowledge aggregation
        apply_stage1(model, cfg)
        trainable1 = sum(p.numel() for p in model.parameters() if p.requires_grad)
        s1_before, _ = evaluate(model, ds1, collator)
        say(f"stage 1: MoLoRA on every FFN linear (E={cfg.num_experts}, r={cfg.r}, top-{cfg.top_k}, "
            f"{cfg.num_shared} shared), LoRA on attention; {trainable1 / 1e6:.2f}M trainable; {steps1} steps")
        train1 = _train_stage(model, tokenizer, ds1, collator, out / "stage1", "stage 1", steps1,
                              spec.stage1_lr, spec, seed, device)
        s1_after, load = evaluate(model, ds1, collator, expert_load=True)
        after_stage1 = {k: generate(model, tokenizer, ex.messages[:-1], spec.max_new_tokens)
                        for k, ex in probes.items()}

        # stage 2: alignment with the orthogonality penalty
        to_stage2(merge_lora(model, "attn"), cfg)
        trainable2 = sum(p.numel() for p in model.parameters() if p.requires_grad)
        pen_before = float(orthogonal_penalty(model).detach())
        s2_before, _ = evaluate(model, ds2, collator)
        s1_stage2_start, _ = evaluate(model, ds1, collator)  # the routed experts are gone, shared experts remain
        say(f"stage 2: frozen base LoRA (the shared experts) + orthogonal LoRA, lambda={cfg.orth_lambda}; "
            f"{trainable2 / 1e6:.2f}M trainable; {steps2} steps")
        train2 = _train_stage(model, tokenizer, ds2, collator, out / "stage2", "stage 2", steps2,
                              spec.stage2_lr, spec, seed, device)
        pen_after = float(orthogonal_penalty(model).detach())
        s2_after, _ = evaluate(model, ds2, collator)
        s1_after_stage2, _ = evaluate(model, ds1, collator)

    # merge and unload: a plain checkpoint, reloaded with plain transformers
    merged = merge_and_unload(model)
    merged_dir = out / "final-model"
    write_dir_atomically(merged_dir, lambda d: (merged.save_pretrained(d), tokenizer.save_pretrained(d)),
                         overwrite=True, what="final model")
    plain = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).to(device)
    check_ids = collator([ds2[0]])["input_ids"].to(device)
    with torch.no_grad():
        merged.eval()
        plain.eval()
        reload_diff = float((merged(check_ids).logits - plain(check_ids).logits).abs().max())
    final = {k: generate(plain, tokenizer, ex.messages[:-1], spec.max_new_tokens) for k, ex in probes.items()}
    answer_triage = generate(plain, tokenizer, q_triage, spec.max_new_tokens)

    summary = {
        "seed": seed, "size": size, "device": device, "threads": torch.get_num_threads(),
        "machine": _machine(device), "versions": _versions(),
        "backends": {op: sorted(b) for op, b in sorted(backends.items())},
        "model": {"architecture": "Qwen2", "layers": spec.num_layers, "hidden": spec.hidden_size,
                  "intermediate": spec.intermediate_size, "vocab": len(tokenizer), "parameters": n_params,
                  "trainable_stage1": trainable1, "trainable_stage2": trainable2},
        "medcare_config": cfg.to_dict(),
        "data": {"stage1_records": len(ds1), "stage2_records": len(ds2), "stage1_tokens": ds1.num_tokens,
                 "stage2_tokens": ds2.num_tokens},
        "stage1": {"loss_before": s1_before, "loss_after": s1_after, "lr": spec.stage1_lr, **train1},
        "stage2": {"loss_before": s2_before, "loss_after": s2_after, "penalty_before": pen_before,
                   "penalty_after": pen_after, "knowledge_loss_before": s1_stage2_start,
                   "knowledge_loss_after": s1_after_stage2, "lr": spec.stage2_lr, **train2},
        "expert_load": load,
        "reload_max_logit_diff": reload_diff,
        "generations": {
            **{f"knowledge_{k}": {"prompt": ex.messages[-2]["content"], "after_stage1": after_stage1[k],
                                  "final": final[k], "reference": ex.messages[-1]["content"]}
               for k, ex in probes.items()},
            "triage": {"prompt": q_triage[-1]["content"], "reply": answer_triage,
                       "reference": held[1].messages[-1]["content"]},
        },
        "outputs": {"base_model": str(base_dir), "stage1_adapter": str(out / "stage1"),
                    "stage2_adapter": str(out / "stage2"), "final_model": str(merged_dir)},
    }
    if plots:
        summary["plots"] = _plots(summary, out)
    summary["wall_s"] = time.perf_counter() - wall0
    text = render_summary(summary)
    (out / "summary.md").write_text(text + "\n", encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print("\n" + text, flush=True)
    return summary


def _say(message: str) -> None:
    print(f"[medcare demo] {message}", flush=True)


def _machine(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from medcare_kernels import __version__

    return {"medcare-kernels": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3g}" if abs(x) >= 100 else f"{x:.3f}"


def _expert_rows(load: dict[str, list[float]]) -> list[str]:
    lines = []
    for name, frac in load.items():
        short = name.replace("model.layers.", "layer ").replace(".mlp.", " ")
        pct = " ".join(f"{100 * f:3.0f}" for f in frac)
        lines.append(f"| {short} | {pct} | {max(frac) * len(frac):.2f} |")
    return lines


def render_summary(s: dict[str, Any]) -> str:
    """The summary as markdown (printed and written to ``summary.md``)."""
    st1, st2 = s["stage1"], s["stage2"]
    backends = ", ".join(f"{op}: {'/'.join(b)}" for op, b in s["backends"].items()) or "-"
    m = s["model"]
    lines = [
        "## MedCare demo summary",
        "",
        (f"Tiny Qwen2 ({m['layers']} layers, hidden {m['hidden']}, {m['parameters'] / 1e6:.2f}M parameters, random "
        f"init), tokenizer of {m['vocab']} tokens built from the embedded data; seed {s['seed']}; "
        f"{s['device']} ({s['machine']}, {s['threads']} thread{'s' if s['threads'] != 1 else ''}); "
        f"backend: {backends}."),
        "",
        "| | before | after |",
        "|---|---|---|",
        (f"| stage 1 loss (knowledge, {s['data']['stage1_records']} records) | {_fmt(st1['loss_before'])} "
        f"| {_fmt(st1['loss_after'])} |"),
        (f"| stage 2 loss (triage notes, {s['data']['stage2_records']} records) | {_fmt(st2['loss_before'])} "
        f"| {_fmt(st2['loss_after'])} |"),
        f"| orthogonal penalty (stage 2) | {_fmt(st2['penalty_before'])} | {_fmt(st2['penalty_after'])} |",
        (f"| stage 1 loss (knowledge) through stage 2 | {_fmt(st2['knowledge_loss_before'])} "
        f"| {_fmt(st2['knowledge_loss_after'])} |"),
        "",
        "Losses: mean cross-entropy per response token over the stage's whole data set, eval mode. Stage 2 starts "
        "without the routed experts (the shared experts become the frozen base LoRA), hence the jump of the knowledge "
        "loss between the stages" + ("; training on the triage notes then costs this tiny random model more of it."
                                     if st2["knowledge_loss_after"] > st2["knowledge_loss_before"] else "."),
        "",
        "| stage | steps | trainable params | train time | tokens/s |",
        "|---|---|---|---|---|",
        (f"| 1 | {st1['steps']} | {m['trainable_stage1'] / 1e6:.2f}M | {st1['runtime_s']:.1f} s "
        f"| {st1['tokens_per_s']:.0f} |"),
        (f"| 2 | {st2['steps']} | {m['trainable_stage2'] / 1e6:.2f}M | {st2['runtime_s']:.1f} s "
        f"| {st2['tokens_per_s']:.0f} |"),
    ]
    if s.get("expert_load"):
        E = len(next(iter(s["expert_load"].values())))
        lines += ["", ("Expert load after stage 1 (% of the top-k choices per routed expert, knowledge data; "
                      "max/mean = 1.00 is perfectly balanced):"), "",
                  f"| layer | {' '.join(f'e{i:<2}' for i in range(E))} | max/mean |", "|---|---|---|"]
        lines += _expert_rows(s["expert_load"])
    g = s["generations"]
    lines += ["", ("Generations (greedy) of the merged model reloaded with plain transformers "
                  f"(max logit difference to the in-memory model: {s['reload_max_logit_diff']:.1e}):"), "",
              *_knowledge_lines(g),
              f"* held-out triage case: {g['triage']['prompt']}",
              "", "```", g["triage"]["reply"], "```", "", "reference:", "", "```", g["triage"]["reference"], "```",
              "", f"Outputs in {Path(s['outputs']['final_model']).parent}: base-model/, stage1/ and stage2/ "
                  "(adapters), final-model/ (plain transformers checkpoint), summary.md, summary.json"
                  + (", " + ", ".join(s["plots"]) if s.get("plots") else "") + ".",
              f"Time: {s.get('wall_s', 0):.0f} s (after Python start-up and imports)."]
    return "\n".join(lines)


def _knowledge_lines(g: dict[str, Any]) -> list[str]:
    lines = []
    for key, what in (("knowledge_seen", "a stage-1 training question"),
                      ("knowledge_held_out", "a held-out rewording of a stage-1 fact")):
        if key in g:
            lines += [f"* {what}: {g[key]['prompt']}",
                      f"  * after stage 1: {g[key]['after_stage1']!r}",
                      f"  * final model:   {g[key]['final']!r}",
                      f"  * reference:     {g[key]['reference']!r}"]
    return lines


def _plots(s: dict[str, Any], out: Path) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        _say("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lam = s["medcare_config"]["orth_lambda"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    h1 = s["stage1"]["history"]
    a1.plot([h["step"] for h in h1], [h["loss"] for h in h1], marker=".", color="tab:blue")
    a1.set_title("stage 1: knowledge aggregation (MoLoRA)")
    a1.set_xlabel("step")
    a1.set_ylabel("training loss (task)")
    a1.grid(alpha=0.3)
    h2 = s["stage2"]["history"]
    steps = [h["step"] for h in h2]
    task = [h["loss"] - lam * h.get("orth_penalty", 0.0) for h in h2]
    a2.plot(steps, task, marker=".", color="tab:blue", label="task loss")
    a2.set_title(f"stage 2: alignment (orthogonal LoRA, lambda={lam:g})")
    a2.set_xlabel("step")
    a2.set_ylabel("training loss (task)")
    a2.grid(alpha=0.3)
    b2 = a2.twinx()
    b2.plot(steps, [h.get("orth_penalty", float("nan")) for h in h2], marker=".", color="tab:red",
            label="orthogonal penalty")
    b2.set_yscale("log")
    b2.set_ylabel("orthogonal penalty", color="tab:red")
    lines = a2.get_lines() + b2.get_lines()
    a2.legend(lines, [ln.get_label() for ln in lines], loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)
    written = ["loss_curves.png"]

    load = s.get("expert_load")
    if load:
        import numpy as np

        names = [n.replace("model.layers.", "layer ").replace(".mlp.", " ") for n in load]
        data = np.array([v for v in load.values()]) * 100
        fig, ax = plt.subplots(figsize=(1.0 + 0.6 * data.shape[1], 0.9 + 0.35 * len(names)))
        im = ax.imshow(data, cmap="viridis", aspect="auto")
        ax.set_xticks(range(data.shape[1]), [f"e{i}" for i in range(data.shape[1])])
        ax.set_yticks(range(len(names)), names)
        for (i, j), v in np.ndenumerate(data):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if v < data.max() * 0.6 else "black")
        ax.set_title("expert load after stage 1 (% of top-k choices)")
        fig.colorbar(im, ax=ax, fraction=0.03)
        fig.tight_layout()
        fig.savefig(out / "expert_load.png", dpi=110)
        plt.close(fig)
        written.append("expert_load.png")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="medcare demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="medcare-demo", help="directory for everything the demo writes "
                   "(default: ./medcare-demo; files in it are replaced)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tokenizer-independent randomness: model init, "
                   "data order, dropout (default 0)")
    p.add_argument("--quick", action="store_true", help="a smaller model and a few steps: a smoke run")
    p.add_argument("--stage1-steps", type=int, default=None, help="override the number of stage-1 steps")
    p.add_argument("--stage2-steps", type=int, default=None, help="override the number of stage-2 steps")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default 1: the matrices are small and "
                   "a second thread helps little and costs much when the machine is busy)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = p.parse_args(argv)
    for name in ("stage1_steps", "stage2_steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    run_demo(args.output, seed=args.seed, size="quick" if args.quick else "full", device=args.device,
             threads=args.threads, stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps,
             plots=not args.no_plots)
    return 0
