"""Instruction data files: JSON or JSONL records in the ShareGPT or Alpaca format, read into chat messages.

Every record becomes a list of ``{"role": "system"|"user"|"assistant", "content": str}`` messages:

* **ShareGPT** (``conversations``): ``{"conversations": [{"from": "human", "value": "..."},
  {"from": "gpt", "value": "..."}, ...]}``. ``from`` may be ``system``, ``human``/``user`` or
  ``gpt``/``assistant`` (also ``chatgpt``, ``bot``, ``model``). The OpenAI form ``{"messages": [{"role":
  "user", "content": "..."}, ...]}`` is read the same way.
* **Alpaca** (``instruction``/``input``/``output``): ``{"instruction": "...", "input": "...",
  "output": "..."}``; ``input`` (appended to the instruction after a blank line) and ``system`` are optional.

A file is a JSON array of records (``.json``) or one record per line (``.jsonl``; a ``.json`` file that
holds one record per line is read as JSONL too). Blank lines are skipped. Anything malformed raises
:class:`DataFormatError` naming the file and the line (JSONL) or record index (JSON array).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DataFormatError", "Example", "load_records", "parse_record", "read_records"]

_ROLES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bot": "assistant", "model": "assistant",
}


class DataFormatError(ValueError):
    """A data file or one of its records is malformed. ``where`` names the file and line or record."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where


@dataclass
class Example:
    """One record as chat messages; ``where`` is its location (``file.jsonl:17`` or ``file.json record 3``)."""

    messages: list[dict[str, str]]
    where: str


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _turns(record: Mapping[str, Any], key: str, where: str) -> list[dict[str, str]]:
    turns = record[key]
    role_key, text_key = ("from", "value") if key == "conversations" else ("role", "content")
    if not isinstance(turns, list) or not turns:
        raise DataFormatError(where, f'"{key}" must be a non-empty list of turns, got {_short(turns)}')
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or role_key not in turn or text_key not in turn:
            raise DataFormatError(where, f'"{key}"[{i}] must be an object with "{role_key}" and "{text_key}", '
                                         f"got {_short(turn)}")
        role = _ROLES.get(str(turn[role_key]).lower()) if isinstance(turn[role_key], str) else None
        if role is None:
            raise DataFormatError(where, f'"{key}"[{i}]: unknown "{role_key}" {turn[role_key]!r} (expected one of '
                                         f"{sorted(_ROLES)})")
        if role == "system" and i != 0:
            raise DataFormatError(where, f'"{key}"[{i}]: a system turn may only come first')
        if not _nonempty_str(turn[text_key]):
            raise DataFormatError(where, f'"{key}"[{i}] ({turn[role_key]}): "{text_key}" must be a non-empty string, '
                                         f"got {_short(turn[text_key])}")
        messages.append({"role": role, "content": turn[text_key]})
    while messages and messages[-1]["role"] != "assistant":  # trailing prompts carry no response to learn
        messages.pop()
    if not any(m["role"] == "assistant" for m in messages):
        raise DataFormatError(where, f'"{key}" has no assistant turn (from "gpt"/"assistant"): nothing to learn')
    if messages[0]["role"] == "assistant" or (messages[0]["role"] == "system" and messages[1]["role"] != "user"):
        raise DataFormatError(where, f'"{key}" must start with a user turn (after an optional system turn)')
    return messages


def parse_record(record: Any, where: str) -> list[dict[str, str]]:
    """One record (ShareGPT, OpenAI messages or Alpaca) -> chat messages; :class:`DataFormatError` if malformed."""
    if not isinstance(record, Mapping):
        raise DataFormatError(where, f"a record must be a JSON object, got {_short(record)}")
    chat_keys = [k for k in ("conversations", "messages") if k in record]
    if len(chat_keys) == 2:
        raise DataFormatError(where, 'a record has both "conversations" and "messages": use one')
    if chat_keys:
        if "instruction" in record:
            raise DataFormatError(where, f'a record has both "{chat_keys[0]}" (ShareGPT) and "instruction" (Alpaca): '
                                         "use one format per record")
        return _turns(record, chat_keys[0], where)
    if "instruction" in record or "output" in record:
        for key in ("instruction", "output"):
            if key not in record:
                raise DataFormatError(where, f'Alpaca record without "{key}" (keys: {sorted(record)})')
            if not _nonempty_str(record[key]):
                raise DataFormatError(where, f'"{key}" must be a non-empty string, got {_short(record[key])}')
        for key in ("input", "system"):
            if record.get(key) is not None and not isinstance(record[key], str):
                raise DataFormatError(where, f'"{key}" must be a string, got {_short(record[key])}')
        prompt = record["instruction"]
        if (record.get("input") or "").strip():
            prompt = f"{prompt}\n\n{record['input']}"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
        if (record.get("system") or "").strip():
            messages.insert(0, {"role": "system", "content": record["system"]})
        return messages
    raise DataFormatError(where, 'unknown record format: expected "conversations" (ShareGPT: from/value turns), '
                                 f'"messages" (role/content turns) or "instruction"/"output" (Alpaca); keys: '
                                 f"{sorted(record)}")


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_records(path: str | os.PathLike, keyed: bool = False) -> list[tuple[Any, str]]:
    """The raw records of a JSON or JSONL file with their locations: ``[(record, "file.jsonl:17"), ...]``.

    A JSON array (``"file.json record 3"``) or one record per line (``"file.jsonl:17"``). With ``keyed``, a
    file holding one JSON object whose values are all objects (records keyed by id, as PubMedQA's
    ``ori_pqal.json``) is read too (``"file.json record 'id'"``; the key is added as ``"id"`` when the record
    has none). Raises :class:`DataFormatError` naming the line for unreadable or invalid input and for a
    file without records.
    """
    p = Path(path)
    name = str(path)
    if not p.is_file():
        raise DataFormatError(name, "no such file" if not p.exists() else "not a file")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataFormatError(f"{name}:{line}", f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    out: list[tuple[Any, str]] = []
    keyed_records = _keyed_records(text) if keyed else None
    if keyed_records is not None:
        out = [({"id": key, **rec} if "id" not in rec else rec, f"{name} record {key!r}")
               for key, rec in keyed_records.items()]
    elif text.lstrip().startswith("["):  # a JSON array of records
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{name}:{e.lineno}", f"invalid JSON: {e.msg} (column {e.colno})") from None
        out = [(record, f"{name} record {i}") for i, record in enumerate(records)]
    else:  # JSONL: one record per line
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{name}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                hint = " (a .json file must hold one JSON array, a .jsonl file one object per line)" \
                    if lineno == 1 and line.strip() in ("{", "{}") else ""
                raise DataFormatError(where, f"invalid JSON: {e.msg} (column {e.colno}){hint}") from None
            out.append((record, where))
    if not out:
        raise DataFormatError(name, "no records (expected a JSON array of records or one JSON object per line)")
    return out


def _keyed_records(text: str) -> dict[str, dict] | None:
    """``{id: record, ...}`` when the whole text is one JSON object of objects (several lines), else None."""
    if not text.lstrip().startswith("{") or len(text.strip().splitlines()) < 2:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(value, dict) and value and all(isinstance(v, Mapping) for v in value.values()):
        return {str(k): dict(v) for k, v in value.items()}
    return None


def load_records(path: str | os.PathLike) -> list[Example]:
    """Read a JSON or JSONL data file into :class:`Example` s (in file order).

    Raises :class:`DataFormatError` (naming the line or record) for unreadable, invalid or malformed
    input, and for a file without records.
    """
    return [Example(parse_record(record, where), where) for record, where in read_records(path)]
