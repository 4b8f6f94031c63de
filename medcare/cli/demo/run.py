"""``run_demo``: both MedCare stages end to end on the tiny model and the embedded data."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from medcare.cli._common import CLIError, write_dir_atomically
from medcare.cli.demo.evaluate import evaluate, evaluate_held_out, generate
from medcare.cli.demo.model import DATA_FILES, SIZES, DemoSize, build_model, build_tokenizer, data_file
from medcare.cli.demo.plots import plot_summary
from medcare.cli.demo.report import machine, render_summary, versions
from medcare.cli.demo.train import train_stage
from medcare_kernels.backends import record_backends

__all__ = ["run_demo"]


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
    # the adapters record where their base model is (save_adapter reads it), so stage1/ and stage2/ load alone
    model.config.name_or_path = str(base_dir.resolve())
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
    with record_backends() as backends:
        # stage 1: knowledge aggregation
        apply_stage1(model, cfg)
        trainable1 = sum(p.numel() for p in model.parameters() if p.requires_grad)
        s1_before, _ = evaluate(model, ds1, collator)
        say(f"stage 1: MoLoRA on every FFN linear (E={cfg.num_experts}, r={cfg.r}, top-{cfg.top_k}, "
            f"{cfg.num_shared} shared), LoRA on attention; {trainable1 / 1e6:.2f}M trainable; {steps1} steps")
        train1 = train_stage(model, tokenizer, ds1, collator, out / "stage1", "stage 1", steps1,
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
        train2 = train_stage(model, tokenizer, ds2, collator, out / "stage2", "stage 2", steps2,
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
    # medcare eval on the saved base, stage-1 and final models, each loaded from its directory alone
    say("evaluating the base, stage-1 and final models on the held-out multiple-choice set and triage note")
    held_out_eval = evaluate_held_out({"base": base_dir, "stage1": out / "stage1", "final": merged_dir}, device,
                                      spec.max_new_tokens, out / "eval")

    summary = {
        "seed": seed, "size": size, "device": device, "threads": torch.get_num_threads(),
        "machine": machine(device), "versions": versions(),
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
        "evaluation": held_out_eval,
        "generations": {
            **{f"knowledge_{k}": {"prompt": ex.messages[-2]["content"], "after_stage1": after_stage1[k],
                                  "final": final[k], "reference": ex.messages[-1]["content"]}
               for k, ex in probes.items()},
            "triage": {"prompt": q_triage[-1]["content"], "reply": answer_triage,
                       "reference": held[1].messages[-1]["content"]},
        },
        "outputs": {"base_model": str(base_dir), "stage1_adapter": str(out / "stage1"),
                    "stage2_adapter": str(out / "stage2"), "final_model": str(merged_dir), "eval": str(out / "eval")},
    }
    if plots:
        summary["plots"] = plot_summary(summary, out)
    summary["wall_s"] = time.perf_counter() - wall0
    text = render_summary(summary)
    (out / "summary.md").write_text(text + "\n", encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print("\n" + text, flush=True)
    return summary


def _say(message: str) -> None:
    print(f"[medcare demo] {message}", flush=True)
