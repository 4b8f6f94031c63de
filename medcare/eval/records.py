"""Evaluation records: the common medical benchmark formats, detected per record, read into :class:`EvalItem`.

Formats (one per record; a file may mix them):

* **MedQA-style**: ``question``, ``options`` (``{"A": text, ...}`` or a list), ``answer_idx`` (a letter, letters
  ``"ACD"`` or a list of letters) or ``answer`` (letter(s) or the text of the correct option).
* **MedMCQA-style**: ``question``, ``opa``, ``opb``, ``opc``, ``opd`` (``ope`` optional), ``cop``: the correct
  option as a letter or a number. Numbers are 1-based in the original MedMCQA release and 0-based in the
  HuggingFace copy; :func:`load_eval_items` decides per file from the values it sees (``cop_base``).
* **list-style**: ``question``, ``choices`` (a list, or ``{"label": [...], "text": [...]}``), ``answer``: a
  0-based index, a letter, or a list of them.
* **PubMedQA-style**: ``question``, ``context`` (text, list of texts, or ``{"contexts": [...]}``) and
  ``final_decision`` (yes/no/maybe); the original upper-case keys ``QUESTION``/``CONTEXTS`` are read too.
* **instruction** records as ``medcare train`` reads them (ShareGPT ``conversations``, OpenAI ``messages``,
  Alpaca ``instruction``/``output``): open-ended; the last assistant turn is the reference answer.

A record that fits no format, or is malformed, raises :class:`~medcare.data.formats.DataFormatError` naming the
file and line (one line of text).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from medcare.data.formats import DataFormatError, parse_record, read_records

__all__ = ["FORMATS", "SUBJECT_FIELDS", "EvalItem", "load_eval_items", "parse_eval_record"]

FORMATS = ("medqa", "medmcqa", "list", "pubmedqa", "instruction")
#: Record fields read as the item's subject/category (first present), unless ``subject_field`` names one.
SUBJECT_FIELDS = ("subject", "subject_name", "category", "meta_info", "topic_name")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_MEDMCQA_KEYS = ("opa", "opb", "opc", "opd", "ope")
_PUBMEDQA_OPTIONS = ("yes", "no", "maybe")


@dataclass
class EvalItem:
    """One evaluation record.

    ``options``: ``[(letter, text), ...]`` (empty for open-ended items); ``answer``: the gold letters, sorted
    (more than one for multi-answer items); ``reference``: the reference text of an open-ended item (for a
    choice item, the gold options' texts). ``messages``: chat turns before the question (system prompt,
    earlier turns of a conversation); the question itself is ``question`` (with ``context`` before it).
    ``record``: the raw record (``medcare experts --by FIELD``).
    """

    where: str
    format: str
    question: str
    options: list[tuple[str, str]] = field(default_factory=list)
    answer: tuple[str, ...] = ()
    reference: str = ""
    context: str = ""
    messages: list[dict[str, str]] = field(default_factory=list)
    subject: str | None = None
    id: str | None = None
    record: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_choice(self) -> bool:
        """True for a multiple-choice item (it has options)."""
        return bool(self.options)

    @property
    def is_multi(self) -> bool:
        """True for a multi-answer item (more than one correct letter)."""
        return len(self.answer) > 1

    @property
    def letters(self) -> list[str]:
        return [letter for letter, _ in self.options]

    @property
    def file(self) -> str:
        """The file part of ``where``."""
        return re.sub(r"(:\d+| record .*)$", "", self.where)


def _text(value: Any, where: str, key: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise DataFormatError(where, f'"{key}" must be a non-empty string, got {_short(value)}')
    return value.strip()


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _letters_of(value: Any, letters: Sequence[str], where: str, key: str, texts: Sequence[str] = (),
                index_base: int | None = None) -> tuple[str, ...]:
    """Gold letters from a letter, a letter string ("ACD", "A,C"), an index, an option text or a list of them."""
    def one(v: Any) -> list[str]:
        if isinstance(v, bool):
            raise DataFormatError(where, f'"{key}" must be a letter or an index, got {v!r}')
        if isinstance(v, int):
            if index_base is None:
                raise DataFormatError(where, f'"{key}" must be a letter, got the number {v}')
            i = v - index_base
            if not 0 <= i < len(letters):
                raise DataFormatError(where, f'"{key}" {v} is out of range for {len(letters)} options '
                                             f"({index_base}-based)")
            return [letters[i]]
        if isinstance(v, str):
            s = v.strip()
            if s.isdigit() and index_base is not None:
                return one(int(s))
            folded = [t.strip().casefold() for t in texts]
            if s.casefold() in folded:  # an option's own text first: "ACE" may be a drug class, not A, C and E
                return [letters[folded.index(s.casefold())]]
            compact = re.sub(r"[\s,;、&]|\band\b", "", s) if len(s) <= 3 * len(letters) else s
            if compact and compact.upper() == compact and all(c in letters for c in compact):
                return list(compact)
            if len(compact) == 1 and compact.upper() in letters:
                return [compact.upper()]
        raise DataFormatError(where, f'"{key}" {_short(v)} is neither an option letter ({", ".join(letters)})'
                                     + (", an index" if index_base is not None else "")
                                     + (" nor the text of an option" if texts else ""))

    if isinstance(value, (list, tuple)):
        if not value:
            raise DataFormatError(where, f'"{key}" is an empty list')
        out = [x for v in value for x in one(v)]
    else:
        out = one(value)
    return tuple(sorted(set(out)))


def _subject(record: Mapping[str, Any], subject_field: str | None) -> str | None:
    keys = (subject_field,) if subject_field else SUBJECT_FIELDS
    for k in keys:
        v = record.get(k)
        if v is not None and v != "":
            return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
    return None


def _record_id(record: Mapping[str, Any]) -> str | None:
    for k in ("id", "qid", "pubid", "question_id"):
        if record.get(k) is not None:
            return str(record[k])
    return None


def _detect(record: Mapping[str, Any], where: str) -> str:
    found = []
    if "options" in record:
        found.append("medqa")
    if "opa" in record:
        found.append("medmcqa")
    if "choices" in record:
        found.append("list")
    if "final_decision" in record:
        found.append("pubmedqa")
    if any(k in record for k in ("conversations", "messages", "instruction")):
        found.append("instruction")
    if len(found) > 1:
        raise DataFormatError(where, f"the record fits several formats ({', '.join(found)}): keys {sorted(record)}")
    if not found:
        raise DataFormatError(where, 'unknown evaluation record: expected MedQA-style ("question", "options", '
                                     '"answer_idx"/"answer"), MedMCQA-style ("question", "opa".."opd", "cop"), '
                                     'list-style ("question", "choices", "answer"), PubMedQA-style ("question", '
                                     '"context", "final_decision") or an instruction record ("conversations", '
                                     f'"messages" or "instruction"/"output"); keys: {sorted(record)}')
    return found[0]


def _question(record: Mapping[str, Any], where: str, *keys: str) -> str:
    for k in keys:
        if k in record:
            return _text(record[k], where, k)
    raise DataFormatError(where, f'missing "{keys[0]}" (keys: {sorted(record)})')


def _options_list(raw: Any, where: str, key: str) -> list[tuple[str, str]]:
    if isinstance(raw, Mapping) and set(raw) >= {"text"} and isinstance(raw.get("text"), list):
        labels = raw.get("label") or list(LETTERS[: len(raw["text"])])
        pairs = list(zip(labels, raw["text"]))
        if len(labels) != len(raw["text"]):
            raise DataFormatError(where, f'"{key}": {len(labels)} labels for {len(raw["text"])} texts')
    elif isinstance(raw, Mapping):
        pairs = list(raw.items())
    elif isinstance(raw, list):
        pairs = list(zip(LETTERS, raw))
        if len(raw) > len(LETTERS):
            raise DataFormatError(where, f'"{key}" has {len(raw)} options; at most {len(LETTERS)} are supported')
    else:
        raise DataFormatError(where, f'"{key}" must be an object {{letter: text}} or a list of texts, '
                                     f"got {_short(raw)}")
    if len(pairs) < 2:
        raise DataFormatError(where, f'"{key}" must hold at least 2 options, got {len(pairs)}')
    out = []
    for label, text in pairs:
        label = str(label).strip().upper()
        if len(label) != 1 or label not in LETTERS:
            raise DataFormatError(where, f'"{key}": option labels must be single letters A-Z, got {label!r}')
        out.append((label, _text(text, where, f"{key}[{label}]")))
    if len({label for label, _ in out}) != len(out):
        raise DataFormatError(where, f'"{key}" repeats an option letter: {[label for label, _ in out]}')
    return out


def _context(value: Any, where: str) -> str:
    if isinstance(value, Mapping):
        value = value.get("contexts", value.get("CONTEXTS"))
    if isinstance(value, list) and all(isinstance(v, str) for v in value) and value:
        return "\n".join(v.strip() for v in value)
    return _text(value, where, "context")


def parse_eval_record(record: Any, where: str, subject_field: str | None = None,
                      cop_base: int | None = None) -> EvalItem:
    """One record (any of :data:`FORMATS`) -> :class:`EvalItem`; :class:`DataFormatError` if malformed.

    ``cop_base``: 0 or 1, how MedMCQA ``cop`` numbers count (``None``: numbers are an error).
    """
    if not isinstance(record, Mapping):
        raise DataFormatError(where, f"a record must be a JSON object, got {_short(record)}")
    fmt = _detect(record, where)
    common: dict[str, Any] = {"where": where, "format": fmt, "subject": _subject(record, subject_field),
                              "id": _record_id(record), "record": record}
    if fmt == "instruction":
        messages = parse_record(record, where)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if messages[last - 1]["role"] != "user":
            raise DataFormatError(where, "the last assistant turn (the reference) must follow a user turn (the "
                                         "question)")
        prior, user = messages[: last - 1], messages[last - 1]
        return EvalItem(question=user["content"], reference=messages[last]["content"], messages=prior, **common)
    if fmt == "pubmedqa":
        question = _question(record, where, "question", "QUESTION")
        ctx_key = next((k for k in ("context", "CONTEXTS", "contexts") if k in record), None)
        if ctx_key is None:
            raise DataFormatError(where, f'PubMedQA-style record without "context" (keys: {sorted(record)})')
        decision = record["final_decision"]
        if not isinstance(decision, str) or decision.strip().lower() not in _PUBMEDQA_OPTIONS:
            raise DataFormatError(where, f'"final_decision" must be yes, no or maybe, got {_short(decision)}')
        options = list(zip(LETTERS, _PUBMEDQA_OPTIONS))
        gold = LETTERS[_PUBMEDQA_OPTIONS.index(decision.strip().lower())]
        return EvalItem(question=question, context=_context(record[ctx_key], where), options=options,
                        answer=(gold,), reference=decision.strip().lower(), **common)
    question = _question(record, where, "question")
    if fmt == "medqa":
        options = _options_list(record["options"], where, "options")
        letters, texts = [c for c, _ in options], [t for _, t in options]
        if "answer_idx" in record:
            answer = _letters_of(record["answer_idx"], letters, where, "answer_idx")
            if isinstance(record.get("answer"), str) and len(answer) == 1 and not _is_letters(record["answer"]):
                gold_text = texts[letters.index(answer[0])]
                if record["answer"].strip().casefold() != gold_text.casefold():
                    raise DataFormatError(where, f'"answer" {_short(record["answer"])} is not the text of option '
                                                 f'{answer[0]} ({_short(gold_text)}) given by "answer_idx"')
        elif "answer" in record:
            answer = _letters_of(record["answer"], letters, where, "answer", texts)
        else:
            raise DataFormatError(where, 'MedQA-style record without "answer_idx" or "answer" '
                                         f"(keys: {sorted(record)})")
    elif fmt == "medmcqa":
        keys = [k for k in _MEDMCQA_KEYS if k in record and record[k] not in (None, "")]
        missing = [k for k in _MEDMCQA_KEYS[:4] if k not in keys]
        if missing:
            raise DataFormatError(where, f"MedMCQA-style record without {missing} (keys: {sorted(record)})")
        options = [(LETTERS[i], _text(record[k], where, k)) for i, k in enumerate(keys)]
        if "cop" not in record:
            raise DataFormatError(where, f'MedMCQA-style record without "cop" (keys: {sorted(record)})')
        letters = [c for c, _ in options]
        cop = record["cop"]
        if isinstance(cop, str) and len(cop.strip()) == 1 and cop.strip().lower() in "abcde":
            cop = cop.strip().upper()
        answer = _letters_of(cop, letters, where, "cop", index_base=cop_base)
    else:  # list
        options = _options_list(record["choices"], where, "choices")
        if "answer" not in record:
            raise DataFormatError(where, f'list-style record without "answer" (keys: {sorted(record)})')
        letters, texts = [c for c, _ in options], [t for _, t in options]
        answer = _letters_of(record["answer"], letters, where, "answer", texts, index_base=0)
    reference = "; ".join(t for c, t in options if c in answer)
    return EvalItem(question=question, options=options, answer=answer, reference=reference, **common)


def _is_letters(text: str) -> bool:
    s = re.sub(r"[\s,;]", "", text)
    return bool(s) and all(c in LETTERS for c in s)


def _cop_base(records: Sequence[tuple[Any, str]], path: str) -> int | None:
    """0 or 1: how this file's MedMCQA ``cop`` numbers count, from the values seen; None when none is a number."""
    numbers = []
    for record, _ in records:
        if isinstance(record, Mapping) and "opa" in record:
            cop = record.get("cop")
            if isinstance(cop, str) and cop.strip().isdigit():
                cop = int(cop.strip())
            if isinstance(cop, int) and not isinstance(cop, bool):
                n = sum(1 for k in _MEDMCQA_KEYS if record.get(k) not in (None, ""))
                numbers.append((cop, n))
    if not numbers:
        return None
    zero = any(c == 0 for c, _ in numbers)
    top = any(c == n for c, n in numbers)
    if zero and top:
        raise DataFormatError(path, '"cop" takes both the value 0 and the number of options: neither 0-based nor '
                                    "1-based; fix the file")
    if zero:
        return 0
    if top:
        return 1
    raise DataFormatError(path, '"cop" numbers are ambiguous here (none is 0 or the number of options): pass '
                                "cop_base=0 (HuggingFace medmcqa, 0-3) or 1 (the original release, 1-4); "
                                "medcare eval: --cop_base")


def load_eval_items(path: str | os.PathLike, subject_field: str | None = None, cop_base: int | str = "auto",
                    limit: int | None = None) -> list[EvalItem]:
    """Read a JSON/JSONL evaluation file (records keyed by id too) into :class:`EvalItem` s, in file order.

    ``cop_base``: ``"auto"`` (decided from the file's MedMCQA ``cop`` values), 0 or 1. ``limit``: the first
    ``limit`` records only. Raises :class:`DataFormatError` naming the file and line of the first bad record.
    """
    records = read_records(path, keyed=True)
    if limit is not None:
        records = records[:limit]
    if cop_base == "auto":
        base = _cop_base(records, str(path))
    elif cop_base in (0, 1, "0", "1"):
        base = int(cop_base)
    else:
        raise ValueError(f"cop_base must be 'auto', 0 or 1, got {cop_base!r}")
    items = [parse_eval_record(record, where, subject_field, base) for record, where in records]
    if subject_field and all(item.subject is None for item in items):
        fields = sorted({k for r, _ in records if isinstance(r, Mapping) for k in r})
        raise DataFormatError(str(path), f"no record has the subject field {subject_field!r} (fields: {fields})")
    return items
