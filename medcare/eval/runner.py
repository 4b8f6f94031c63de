"""Scoring evaluation items with a model: one prediction record per item.

Methods (``method``):

* ``"loglik"``: for a single-answer multiple-choice item, the option with the highest log-likelihood as the
  reply to the prompt, normalised by the option's length in characters (``normalize="chars"``, lm-evaluation-
  harness's ``acc_norm``), by its token count (``"tokens"``) or not (``"none"``, lm-eval's ``acc``). The scored
  continuation is the option's text (``loglik_target="text"``, default) or its letter (``"letter"``; the prompt
  then ends with the answer instruction). No generation.
* ``"generate"``: greedy generation; the answer letters are extracted (:mod:`medcare.eval.extract`); a
  multi-answer item is correct only when the set of letters matches exactly.
* ``"auto"``: loglik for single-answer items, generate for multi-answer ones.

Open-ended items (instruction records) are always generated and scored by exact match and ROUGE-L against
the reference. Multi-answer items are generated under ``"loglik"`` too (one option cannot be a set).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from medcare.eval.extract import extract_letters
from medcare.eval.metrics import exact_match, rouge_l
from medcare.eval.prompts import adds_special_tokens, prompt_for
from medcare.eval.records import EvalItem
from medcare.eval.scoring import generate_greedy, loglikelihoods

__all__ = ["METHODS", "EvalOptions", "evaluate_items", "item_method"]

METHODS = ("auto", "loglik", "generate")
NORMALIZE = ("chars", "tokens", "none")
TARGETS = ("text", "letter")


@dataclass
class EvalOptions:
    """How items are scored (see the module doc). ``bf16``: forwards under bfloat16 autocast."""

    method: str = "auto"
    normalize: str = "chars"
    loglik_target: str = "text"
    template: str = "auto"
    system: str | None = None
    batch_size: int = 8
    max_new_tokens: int = 128
    max_length: int | None = None
    bf16: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name, allowed in (("method", METHODS), ("normalize", NORMALIZE), ("loglik_target", TARGETS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def item_method(item: EvalItem, method: str) -> str:
    """The method that scores ``item``: ``"loglik"``, ``"generate"`` (choice) or ``"open"`` (exact match)."""
    if not item.is_choice:
        return "open"
    if item.is_multi or method == "generate":
        return "generate"
    return "loglik"


def _base_record(item: EvalItem) -> dict[str, Any]:
    rec: dict[str, Any] = {"file": item.file, "where": item.where, "id": item.id, "format": item.format,
                           "subject": item.subject, "question": item.question}
    if item.is_choice:
        rec["options"] = dict(item.options)
        rec["gold"] = "".join(item.answer)
    return rec


def _loglik(model: Any, tokenizer: Any, items: list[EvalItem], opts: EvalOptions, special: bool,
            autocast: torch.dtype | None, desc: str) -> list[dict[str, Any]]:
    letter = opts.loglik_target == "letter"
    requests, spans = [], []
    for item in items:
        context = prompt_for(item, tokenizer, opts.template, opts.system, instruction=letter)
        start = len(requests)
        requests += [(context, c if letter else t) for c, t in item.options]
        spans.append((start, len(requests)))
    results = loglikelihoods(model, tokenizer, requests, opts.batch_size, special, opts.max_length, autocast,
                             opts.progress, desc)
    out = []
    for item, (a, b) in zip(items, spans):
        scores = {}
        for (c, t), res in zip(item.options, results[a:b]):
            length = {"chars": len(c if letter else t), "tokens": res.tokens, "none": 1}[opts.normalize]
            scores[c] = res.logprob / length
        pred = max(scores, key=lambda c: scores[c])  # ties: the first option, as numpy's argmax
        out.append({**_base_record(item), "method": "loglik", "pred": pred, "correct": (pred,) == item.answer,
                    "scores": scores, "logprobs": {c: r.logprob for (c, _), r in zip(item.options, results[a:b])},
                    "normalize": opts.normalize, "target": opts.loglik_target})
    return out


def _generate(model: Any, tokenizer: Any, items: list[EvalItem], opts: EvalOptions, special: bool,
              autocast: torch.dtype | None, desc: str) -> list[dict[str, Any]]:
    prompts = [prompt_for(item, tokenizer, opts.template, opts.system) for item in items]
    replies = generate_greedy(model, tokenizer, prompts, opts.max_new_tokens, opts.batch_size, special, autocast,
                              opts.progress, desc)
    out = []
    for item, reply in zip(items, replies):
        rec = {**_base_record(item), "output": reply}
        if item.is_choice:
            pred = extract_letters(reply, item.letters, item.options, item.is_multi)
            rec.update(method="generate", pred="".join(pred) if pred else None, correct=pred == item.answer)
        else:
            rec.update(method="open", reference=item.reference, exact_match=exact_match(reply, item.reference),
                       rouge_l=rouge_l(reply, item.reference))
        out.append(rec)
    return out


def evaluate_items(model: Any, tokenizer: Any, items: Sequence[EvalItem], options: EvalOptions | None = None,
                   desc: str = "eval") -> list[dict[str, Any]]:
    """Score ``items`` with ``model`` (eval mode, no gradient); one prediction dict per item, in item order.

    Every prediction has ``file``, ``where``, ``id``, ``format``, ``subject``, ``question``, ``method``; a
    choice item also ``options``, ``gold`` (letters), ``pred`` (letters or None) and ``correct``, with the
    per-option ``scores`` (normalised) and ``logprobs`` under loglik, the ``output`` under generate; an
    open-ended item ``output``, ``reference``, ``exact_match`` and ``rouge_l``.
    """
    opts = options or EvalOptions()
    special = adds_special_tokens(tokenizer, opts.template)
    autocast = torch.bfloat16 if opts.bf16 else None
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    groups: dict[str, list[int]] = {"loglik": [], "generate": [], "open": []}
    for i, item in enumerate(items):
        groups[item_method(item, opts.method)].append(i)
    preds: list[dict[str, Any] | None] = [None] * len(items)
    if groups["loglik"]:
        chosen = [items[i] for i in groups["loglik"]]
        for i, p in zip(groups["loglik"], _loglik(model, tokenizer, chosen, opts, special, autocast,
                                                  f"{desc} (loglik)")):
            preds[i] = p
    gen = groups["generate"] + groups["open"]
    if gen:
        chosen = [items[i] for i in gen]
        for i, p in zip(gen, _generate(model, tokenizer, chosen, opts, special, autocast, f"{desc} (generate)")):
            preds[i] = p
    return preds  # type: ignore[return-value]
