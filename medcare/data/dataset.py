"""Tokenising chat examples for causal-LM fine-tuning with the loss on the responses only, and a collator.

Rendering: with the tokenizer's chat template when it has one (``template="auto"`` or ``"chat"``), else a
plain template (``"plain"``)::

    [system text + blank line]
    ### Instruction:
    <user turn>

    ### Response:
    <assistant turn><eos>

(repeated per turn pair, separated by a blank line). The text is tokenised once, as a whole, with the
offsets of every token; a token belongs to a response when its characters overlap an assistant turn's
span. With a chat template the span of turn ``i`` is what ``apply_chat_template(messages[:i+1])`` adds to
``apply_chat_template(messages[:i], add_generation_prompt=True)`` (the content and the template's end-of-turn
marker, so the model learns to stop). Labels are the input ids on response tokens and ``-100`` elsewhere.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from medcare.data.formats import DataFormatError, Example, load_records

__all__ = ["IGNORE_INDEX", "SFTDataset", "build_dataset", "make_collator", "prompt_text", "render",
           "resolve_template", "tokenize_messages"]

IGNORE_INDEX = -100
TEMPLATES = ("auto", "chat", "plain")


def resolve_template(tokenizer: Any, template: str = "auto") -> str:
    """``"chat"`` or ``"plain"``: ``auto`` uses the chat template when the tokenizer has one."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_chat:
        raise ValueError("template='chat' but the tokenizer has no chat template: use 'plain' or 'auto'")
    if template == "auto":
        return "chat" if has_chat else "plain"
    return template


def _eos_text(tokenizer: Any) -> str:
    return tokenizer.eos_token if isinstance(getattr(tokenizer, "eos_token", None), str) else ""


def _plain(messages: Sequence[dict[str, str]], eos: str, generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0

    def add(text: str, response: bool = False) -> None:
        nonlocal pos
        parts.append(text)
        if response:
            spans.append((pos, pos + len(text)))
        pos += len(text)

    for i, m in enumerate(messages):
        if m["role"] == "system":
            add(m["content"] + "\n\n")
        elif m["role"] == "user":
            add(f"### Instruction:\n{m['content']}\n\n### Response:\n")
        else:
            add(m["content"] + eos, response=True)
            if i + 1 < len(messages):
                add("\n\n")
    if generation_prompt and messages and messages[-1]["role"] == "assistant":
        add("\n\n")
    return "".join(parts), spans


def _chat(messages: Sequence[dict[str, str]], tokenizer: Any, where: str) -> tuple[str, list[tuple[int, int]]]:
    def apply(msgs, gen):
        return tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=gen)

    try:
        text = apply(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, upto = apply(messages[:i], True), apply(messages[: i + 1], False)
            if not upto.startswith(before) or not text.startswith(upto):
                raise DataFormatError(where, "the tokenizer's chat template renders earlier turns differently once "
                                             "later turns follow, so the responses cannot be located; use "
                                             "--template plain")
            # the turn's content and end-of-turn marker, without the whitespace the template puts after it
            spans.append((len(before), len(upto.rstrip())))
    except DataFormatError:
        raise
    except Exception as e:  # jinja errors: templates that reject a role order, missing variables...
        raise DataFormatError(where, f"the tokenizer's chat template failed on this record: {e}") from e
    return text, spans


def render(messages: Sequence[dict[str, str]], tokenizer: Any, template: str = "auto",
           where: str = "record") -> tuple[str, list[tuple[int, int]]]:
    """The training text of ``messages`` and the character spans of the assistant turns."""
    if resolve_template(tokenizer, template) == "chat":
        return _chat(messages, tokenizer, where)
    return _plain(messages, _eos_text(tokenizer), False)


def prompt_text(messages: Sequence[dict[str, str]], tokenizer: Any, template: str = "auto") -> str:
    """The text to generate a reply from (``messages`` end with a user turn)."""
    if resolve_template(tokenizer, template) == "chat":
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return _plain(messages, _eos_text(tokenizer), True)[0]


def tokenize_messages(messages: Sequence[dict[str, str]], tokenizer: Any, template: str = "auto",
                      max_length: int | None = None, where: str = "record") -> dict[str, list[int]]:
    """``{"input_ids", "attention_mask", "labels"}`` for one example (labels -100 outside the responses).

    Truncated on the right to ``max_length`` tokens. Needs a fast tokenizer (token offsets).
    """
    kind = resolve_template(tokenizer, template)
    text, spans = render(messages, tokenizer, kind, where)
    enc = tokenizer(text, add_special_tokens=(kind == "plain"), return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = []
    for tok, (start, end) in zip(ids, offsets):
        inside = end > start and any(start < s_end and end > s_start for s_start, s_end in spans)
        labels.append(tok if inside else IGNORE_INDEX)
    if max_length is not None and len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": list(ids), "attention_mask": [1] * len(ids), "labels": labels}


class SFTDataset(torch.utils.data.Dataset):
    """Tokenised examples (lists of ints) with statistics: ``num_tokens``, ``num_response_tokens``,
    ``num_truncated`` and ``num_dropped`` (examples without any response token left after truncation)."""

    def __init__(self, features: list[dict[str, list[int]]], examples: list[Example], num_truncated: int = 0,
                 num_dropped: int = 0):
        self.features = features
        self.examples = examples
        self.num_truncated = num_truncated
        self.num_dropped = num_dropped
        self.num_tokens = sum(len(f["input_ids"]) for f in features)
        self.num_response_tokens = sum(sum(1 for t in f["labels"] if t != IGNORE_INDEX) for f in features)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.features[i]


def build_dataset(source: str | os.PathLike | Sequence[Example], tokenizer: Any, template: str = "auto",
                  max_length: int | None = 2048) -> SFTDataset:
    """Load (a path) or take (examples) the records and tokenise them with response-only labels.

    Raises :class:`DataFormatError` for malformed records and when no example keeps a response token.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("medcare needs a fast (Rust) tokenizer for response-only labels (token offsets); "
                         f"got {type(tokenizer).__name__}")
    examples = load_records(source) if isinstance(source, (str, os.PathLike)) else list(source)
    features, kept, truncated, dropped = [], [], 0, 0
    for ex in examples:
        f = tokenize_messages(ex.messages, tokenizer, template, None, ex.where)
        if max_length is not None and len(f["input_ids"]) > max_length:
            truncated += 1
            f = {k: v[:max_length] for k, v in f.items()}
        if all(t == IGNORE_INDEX for t in f["labels"]):
            dropped += 1
            continue
        features.append(f)
        kept.append(ex)
    name = str(source) if isinstance(source, (str, os.PathLike)) else "data"
    if not features:
        raise DataFormatError(name, f"no example keeps a response token within max_length={max_length}")
    if dropped:
        warnings.warn(f"{name}: {dropped} of {len(examples)} examples have no response token within "
                      f"max_length={max_length} and were dropped", stacklevel=2)
    return SFTDataset(features, kept, truncated, dropped)


def make_collator(tokenizer: Any, pad_to_multiple_of: int | None = None):
    """Right-padding collator: ``input_ids`` with the pad token, ``attention_mask`` 0, ``labels`` -100.

    Sets ``tokenizer.pad_token`` to the EOS token when the tokenizer has none, and pads on the right.
    """
    from transformers import DataCollatorForSeq2Seq

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=pad_to_multiple_of,
                                  label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
