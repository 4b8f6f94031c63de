"""``medcare eval``: accuracy of a merged, stage-1 or stage-2 model on multiple-choice and open-ended data.

    medcare eval --model DIR --data FILE [--data FILE ...] [--output DIR] [options]
    medcare eval --model BASE --adapter STAGE_DIR --data FILE ...

``--model`` is a merged checkpoint (``medcare merge``), a stage-1 output (routed experts active) or a
stage-2 output (base model recorded in its ``medcare_config.json``). Records are detected per record:
MedQA-style (question, options, answer_idx/answer), MedMCQA-style (opa..opd, cop), list-style (choices,
answer), PubMedQA-style (context, final_decision) and the instruction formats of ``medcare train`` (the
response is the reference). Prompts use the tokenizer's chat template when it has one.

Methods: ``loglik`` (the default for single-answer multiple choice: the option with the highest
length-normalised log-likelihood, as lm-evaluation-harness's acc_norm), ``generate`` (greedy, the answer
letters extracted; multi-answer items count only when the set matches; the default for multi-answer items),
open-ended items by exact match and ROUGE-L. Prints the table; with ``--output`` writes ``results.json``,
``results.md`` and ``predictions.jsonl`` there (each file atomically).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medcare.cli._common import CLIError, say

__all__ = ["main", "run_eval"]


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The options ``medcare eval`` and ``medcare experts`` share: model, data, batching, dtype, device."""
    p.add_argument("--model", required=True, help="a merged checkpoint, a stage-1/stage-2 adapter directory "
                   "(medcare train --output_dir, or a checkpoint-* in it) or, with --adapter, the base model")
    p.add_argument("--adapter", default=None, metavar="DIR", help="a stage-1 or stage-2 adapter directory to put "
                   "on --model (default: --model is the adapter and names its base)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the adapter directory's, else the model's)")
    p.add_argument("--data", action="append", required=True, metavar="FILE",
                   help="a JSON/JSONL evaluation file; repeat for several")
    p.add_argument("--output", default=None, metavar="DIR", help="directory for the results (created if needed)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=8, help="sequences per forward")
    p.add_argument("--bf16", action="store_true", help="bfloat16 base weights and autocast (as training's --bf16)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--template", choices=("auto", "chat", "plain"), default="auto",
                   help="prompt format: the tokenizer's chat template, a plain ### Instruction/### Response template, "
                        "or auto (chat when the tokenizer has one)")
    p.add_argument("--limit", type=int, default=None, help="the first N records of each file only")
    p.add_argument("--subject_field", "--subject-field", default=None, metavar="FIELD",
                   help="record field to break accuracy down by (default: the first of subject, subject_name, "
                        "category, meta_info, topic_name)")
    p.add_argument("--cop_base", "--cop-base", choices=("auto", "0", "1"), default="auto",
                   help="MedMCQA cop numbers: 0-based (HuggingFace copy), 1-based (original release), or auto "
                        "(from the values in the file)")
    p.add_argument("--trust_remote_code", "--trust-remote-code", action="store_true")
    p.add_argument("--no_progress", "--no-progress", action="store_true", help="no progress bars")


def check_counts(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise CLIError(f"--{name} must be >= 1, got {value}")


def load_data(args: argparse.Namespace) -> dict[str, list]:
    """``{file: items}`` for every ``--data`` (malformed records raise DataFormatError naming file and line)."""
    from medcare.eval import load_eval_items

    data = {}
    for path in args.data:
        if path in data:
            raise CLIError(f"--data {path!r} is given twice")
        data[path] = load_eval_items(path, args.subject_field, args.cop_base, args.limit)
    return data


def load_model(args: argparse.Namespace):
    from medcare.eval import EvalLoadError, load_for_eval

    try:
        return load_for_eval(args.model, args.adapter, args.tokenizer, args.bf16, args.device,
                             args.trust_remote_code)
    except EvalLoadError as e:
        raise CLIError(str(e)) from e


def _methods(values: list[str] | None, files: list[str]) -> list[str]:
    values = values or ["auto"]
    if len(values) == 1:
        return values * len(files)
    if len(values) != len(files):
        raise CLIError(f"--method is given {len(values)} times for {len(files)} --data files: give it once (every "
                       "file) or once per --data, in the same order")
    return values


def run_eval(args: argparse.Namespace) -> dict:
    """Evaluate every ``--data`` file; returns the results dict (also printed and, with --output, written)."""
    import transformers

    from medcare.eval import EvalOptions, evaluate_items, render_markdown, summarize, write_results

    check_counts(args, ("batch_size", "max_new_tokens", "limit"))
    methods = _methods(args.method, args.data)
    data = load_data(args)  # data first: a malformed file fails before a large model loads
    transformers.utils.logging.disable_progress_bar()
    loaded = load_model(args)
    say(f"evaluating {loaded.description}: {sum(map(len, data.values()))} items in {len(data)} file(s)")
    predictions = []
    for (path, items), method in zip(data.items(), methods):
        opts = EvalOptions(method=method, normalize=args.normalize, loglik_target=args.loglik_target,
                           template=args.template, system=args.system, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, bf16=args.bf16, progress=not args.no_progress)
        predictions += evaluate_items(loaded.model, loaded.tokenizer, items, opts, desc=Path(path).name)
    meta = {"model": loaded.description, "kind": loaded.kind, "base_model": loaded.base, "adapter": loaded.adapter,
            "options": {"method": dict(zip(args.data, methods)), "normalize": args.normalize,
                        "loglik_target": args.loglik_target, "template": args.template,
                        "max_new_tokens": args.max_new_tokens, "bf16": args.bf16}}
    results = summarize(predictions, list(data), meta)
    text = render_markdown(results)
    print(text, flush=True)
    if args.output:
        paths = write_results(args.output, results, predictions, text)
        say(f"results in {paths['results']}, {paths['markdown'].name}, {paths['predictions'].name}")
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medcare eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--method", action="append", choices=("auto", "loglik", "generate"), default=None,
                   help="auto (loglik for single-answer multiple choice, generate for multi-answer), loglik or "
                        "generate; once for every file or once per --data (default: auto)")
    p.add_argument("--normalize", choices=("chars", "tokens", "none"), default="chars",
                   help="loglik: divide an option's log-likelihood by its length in characters (lm-eval acc_norm), "
                        "tokens, or not at all (lm-eval acc)")
    p.add_argument("--loglik_target", "--loglik-target", choices=("text", "letter"), default="text",
                   help="loglik: score the option's text, or its letter after the answer instruction")
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=128, help="generate: reply length cap")
    p.add_argument("--system", default=None, help="a system prompt put before each question")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_eval(args)
    return 0
