"""Summaries of predictions: accuracy per file and per subject with counts and 95% intervals, exact match and
ROUGE-L of open-ended items; as JSON (``results.json``), markdown (``results.md``) and predictions JSONL."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medcare.adapters import atomic_write_text
from medcare.eval.metrics import wilson_interval

__all__ = ["render_markdown", "summarize", "write_results"]


def _accuracy(preds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    n = len(preds)
    correct = sum(1 for p in preds if p["correct"])
    lo, hi = wilson_interval(correct, n)
    methods = sorted({p["method"] for p in preds})
    return {"n": n, "correct": correct, "accuracy": correct / n if n else float("nan"), "ci95": [lo, hi],
            "method": "+".join(methods), "unparsed": sum(1 for p in preds if p["method"] == "generate" and
                                                         p["pred"] is None)}


def _open(preds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    n = len(preds)
    em = sum(1 for p in preds if p["exact_match"])
    lo, hi = wilson_interval(em, n)
    return {"n": n, "exact_match": em / n if n else float("nan"), "exact_match_count": em, "exact_match_ci95": [lo, hi],
            "rouge_l": sum(p["rouge_l"] for p in preds) / n if n else float("nan")}


def _group(preds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    choice = [p for p in preds if p["method"] != "open"]
    opened = [p for p in preds if p["method"] == "open"]
    out: dict[str, Any] = {"n": len(preds)}
    if choice:
        out["choice"] = _accuracy(choice)
    if opened:
        out["open"] = _open(opened)
    subjects = sorted({p["subject"] for p in choice if p.get("subject") is not None})
    if subjects:
        out["subjects"] = {s: _accuracy([p for p in choice if p.get("subject") == s]) for s in subjects}
    return out


def summarize(predictions: Sequence[dict[str, Any]], files: Sequence[str] | None = None,
              meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"files": {file: summary}, "overall": summary, **meta}``; a summary holds ``choice`` (n, correct,
    accuracy, ci95 (Wilson), method, unparsed replies), ``open`` (n, exact_match, its ci95, rouge_l) and
    ``subjects`` (accuracy per subject of the choice items), each only when there are such items."""
    files = list(files) if files is not None else list(dict.fromkeys(p["file"] for p in predictions))
    result: dict[str, Any] = dict(meta or {})
    result["files"] = {f: _group([p for p in predictions if p["file"] == f]) for f in files}
    result["overall"] = _group(predictions)
    return result


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.1f}%"


def _ci(ci: Sequence[float]) -> str:
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def render_markdown(results: dict[str, Any]) -> str:
    """The summary tables as markdown (what ``medcare eval`` prints)."""
    lines = []
    if results.get("model"):
        lines += [f"Model: {results['model']}", ""]
    lines += ["| file | items | method | accuracy | 95% CI | exact match | ROUGE-L |",
              "|---|---|---|---|---|---|---|"]
    rows = list(results["files"].items())
    if len(rows) > 1:
        rows.append(("all files", results["overall"]))
    for name, g in rows:
        c, o = g.get("choice"), g.get("open")
        acc = f"{_pct(c['accuracy'])} ({c['correct']}/{c['n']})" if c else "-"
        em = f"{_pct(o['exact_match'])} ({o['exact_match_count']}/{o['n']})" if o else "-"
        method = "+".join(x for x in ((c or {}).get("method"), "open" if o else None) if x)
        rouge = f"{o['rouge_l']:.3f}" if o else "-"
        shown = Path(name).name if name != "all files" else name
        lines.append(f"| {shown} | {g['n']} | {method} | {acc} | {_ci(c['ci95']) if c else '-'} | {em} | {rouge} |")
    subject_rows = [(name, s, a) for name, g in results["files"].items() for s, a in g.get("subjects", {}).items()]
    if subject_rows:
        lines += ["", "| file | subject | items | correct | accuracy | 95% CI |", "|---|---|---|---|---|---|"]
        lines += [f"| {Path(name).name} | {s} | {a['n']} | {a['correct']} | {_pct(a['accuracy'])} | {_ci(a['ci95'])} |"
                  for name, s, a in subject_rows]
    unparsed = sum((g.get("choice") or {}).get("unparsed", 0) for g in results["files"].values())
    if unparsed:
        lines += ["", f"{unparsed} generated replies had no readable answer letter (counted wrong)."]
    return "\n".join(lines)


def write_results(output: str | os.PathLike, results: dict[str, Any], predictions: Sequence[dict[str, Any]],
                  markdown: str | None = None) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``predictions.jsonl`` into ``output`` (created if needed), each
    atomically (temporary file, fsync, rename): an interrupted run leaves the previous files whole."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json", "markdown": out / "results.md", "predictions": out / "predictions.jsonl"}
    atomic_write_text(paths["predictions"], "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    atomic_write_text(paths["markdown"], (markdown if markdown is not None else render_markdown(results)) + "\n")
    atomic_write_text(paths["results"], json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    return paths
