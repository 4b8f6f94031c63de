"""``medcare experts``: which routed experts a stage-1 model sends a data set's tokens to.

    medcare experts --model STAGE1_DIR --data FILE [--data FILE ...] [--by FIELD] [--output DIR]

For every MoLoRA linear: the fraction of the top-k routing choices each expert receives over the real
tokens (it sums to 1 per linear), the mean router entropy per token (nats, and divided by log E) and the
load's max/mean; with ``--by FIELD`` (e.g. ``subject``) the same per value of that record field. Each record is
routed as a whole conversation (prompt and reference answer), rendered as in training. Prints the table;
with ``--output`` writes ``experts.json`` and the heat map ``experts.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medcare.cli._common import CLIError, say
from medcare.cli.eval import add_model_arguments, check_counts, load_data, load_model

__all__ = ["main", "render_table"]


def render_table(stats: dict) -> str:
    """The per-linear load table as markdown (and one line per group with ``--by``)."""
    from medcare.eval.experts import short_name

    E = max(v["num_experts"] for v in stats["layers"].values())
    lines = [f"Routing of {stats['tokens']} tokens ({stats['items']} records), % of the top-k choices per expert:",
             "", f"| linear | {' '.join(f'e{i:<2}' for i in range(E))} | max/mean | entropy (/log E) |",
             "|---|---|---|---|"]
    for name, v in stats["layers"].items():
        pct = " ".join(f"{100 * f:3.0f}" for f in v["load"])
        lines.append(f"| {short_name(name)} | {pct} | {v['max_over_mean']:.2f} | {v['router_entropy']:.3f} "
                     f"({v['router_entropy_normalized']:.2f}) |")
    if stats.get("groups"):
        lines += ["", (f"By {stats['by']}: tokens, and the mean over the linears of max/mean load and of the "
                       "normalised entropy:"), "", f"| {stats['by']} | records | tokens | max/mean | entropy/log E |",
                  "|---|---|---|---|---|"]
        for g, v in stats["groups"].items():
            ls = list(v["layers"].values())
            mm = sum(x["max_over_mean"] for x in ls) / len(ls)
            ent = sum(x["router_entropy_normalized"] for x in ls) / len(ls)
            lines.append(f"| {g} | {v['items']} | {v['tokens']} | {mm:.2f} | {ent:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="medcare experts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--by", default=None, metavar="FIELD", help="break the load down by this record field "
                   "(e.g. subject)")
    p.add_argument("--max_length", "--max-length", type=int, default=2048, help="records are truncated to this "
                   "many tokens")
    args = p.parse_args(argv)
    check_counts(args, ("batch_size", "limit", "max_length"))

    import transformers

    from medcare.adapters import atomic_write_text
    from medcare.eval.experts import plot_expert_heatmap, routing_statistics

    data = load_data(args)
    items = [it for file_items in data.values() for it in file_items]
    if args.by and all(args.by not in it.record for it in items):
        fields = sorted({k for it in items for k in it.record})
        raise CLIError(f"--by {args.by}: no record has this field (fields: {fields})")
    transformers.utils.logging.disable_progress_bar()
    loaded = load_model(args)
    if loaded.kind != "stage1":
        kind = "stage-2 adapter" if loaded.kind == "stage2" else "plain checkpoint"
        raise CLIError(f"--model {args.model!r} is a {kind}: routing statistics need the routed experts of a "
                       "stage-1 model (a medcare train --stage 1 output, or a checkpoint-* in it)")
    say(f"routing {len(items)} records through {loaded.description}")
    stats = routing_statistics(loaded.model, loaded.tokenizer, items, args.by, args.batch_size, args.template,
                               args.max_length, args.bf16, not args.no_progress)
    stats["model"] = loaded.description
    stats["data"] = list(data)
    print(render_table(stats), flush=True)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "experts.json", json.dumps(stats, indent=1, ensure_ascii=False) + "\n")
        png = plot_expert_heatmap(stats, out / "experts.png")
        say(f"wrote {out / 'experts.json'}" + (f" and {png}" if png else " (no heat map: pip install matplotlib)"))
    return 0
