"""The demo summary as markdown (printed and written to ``summary.md``), and what it says about the machine."""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["machine", "render_summary", "versions"]


def machine(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def versions() -> dict[str, str]:
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
    if s.get("evaluation"):
        lines += ["", *_evaluation_lines(s["evaluation"])]
    g = s["generations"]
    lines += ["", ("Generations (greedy) of the merged model reloaded with plain transformers "
                  f"(max logit difference to the in-memory model: {s['reload_max_logit_diff']:.1e}):"), "",
              *_knowledge_lines(g),
              f"* held-out triage case: {g['triage']['prompt']}",
              "", "```", g["triage"]["reply"], "```", "", "reference:", "", "```", g["triage"]["reference"], "```",
              "", f"Outputs in {Path(s['outputs']['final_model']).parent}: base-model/, stage1/ and stage2/ "
                  "(adapters), final-model/ (plain transformers checkpoint), eval/ (medcare eval results per "
                  "model), summary.md, summary.json"
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


_EVAL_LABELS = {"base": "base (random init)", "stage1": "stage 1 (routed experts)", "final": "final (merged)"}


def _evaluation_lines(ev: dict[str, Any]) -> list[str]:
    """The held-out evaluation table: multiple-choice accuracy (loglik) and the triage note, per model."""
    models = ev["models"]
    lines = [(f"Held-out evaluation (medcare eval on each saved model: {ev['mc_items']} multiple-choice questions "
              f"over the stage-1 facts, reworded, by {ev['mc_method']} (chance 25%); the held-out triage note by "
              "exact match and ROUGE-L):"), "",
             "| model | multiple choice | 95% CI | triage note exact match | triage ROUGE-L |", "|---|---|---|---|---|"]
    for label, m in models.items():
        lines.append(f"| {_EVAL_LABELS.get(label, label)} | {100 * m['accuracy']:.1f}% ({m['correct']}/{m['n']}) "
                     f"| [{100 * m['ci95'][0]:.1f}, {100 * m['ci95'][1]:.1f}] "
                     f"| {'yes' if m['triage_exact_match'] else 'no'} | {m['triage_rouge_l']:.3f} |")
    subjects = list(next(iter(models.values()))["subjects"])
    lines += ["", "| subject | " + " | ".join(_EVAL_LABELS.get(k, k) for k in models) + " |",
              "|---|" + "---|" * len(models)]
    for subject in subjects:
        cells = " | ".join(f"{m['subjects'][subject][0]}/{m['subjects'][subject][1]}" for m in models.values())
        lines.append(f"| {subject} | {cells} |")
    return lines
