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
5. ``medcare eval`` (:mod:`medcare.eval`) on ``DIR/base-model``, the stage-1 adapter ``DIR/stage1`` (its recorded
   base model) and ``DIR/final-model``: the held-out multiple-choice set (loglik) and the held-out triage note
   (exact match, ROUGE-L); results per model in ``DIR/eval/<model>/``.

Prints and writes (``DIR/summary.md``, ``DIR/summary.json``) a summary table: task losses before and after
each stage, the penalty before and after stage 2, the expert load per layer, tokens/s, the backend used, the
held-out accuracy of the base, stage-1 and final models;
plots the loss curves and the expert load (``DIR/loss_curves.png``, ``DIR/expert_load.png``). Deterministic
for a given ``--seed`` on one machine and thread count.
"""

from __future__ import annotations

import argparse

from medcare.cli._common import CLIError
from medcare.cli.demo.evaluate import evaluate, generate
from medcare.cli.demo.model import (
    CHAT_TEMPLATE,
    DATA_FILES,
    HELD_OUT_MC,
    SIZES,
    SPECIAL_TOKENS,
    DemoSize,
    build_model,
    build_tokenizer,
    data_file,
)
from medcare.cli.demo.report import render_summary
from medcare.cli.demo.run import run_demo

__all__ = ["CHAT_TEMPLATE", "DATA_FILES", "HELD_OUT_MC", "SIZES", "SPECIAL_TOKENS", "DemoSize", "build_model",
           "build_tokenizer", "data_file", "evaluate", "generate", "main", "render_summary",
           "run_demo"]


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
