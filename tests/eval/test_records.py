"""Evaluation record formats, detected per record, and malformed records named by file and line."""

from __future__ import annotations

import json

import pytest

from medcare.data.formats import DataFormatError
from medcare.eval import load_eval_items, parse_eval_record
from tests.eval.conftest import write_jsonl

OPTS = {"A": "a statin", "B": "a biguanide", "C": "a loop diuretic", "D": "a beta blocker"}

# record -> (format, options (letters: texts), gold letters, reference, subject)
CASES = {
    "medqa answer_idx": ({"question": "Q", "options": OPTS, "answer_idx": "B", "answer": "a biguanide",
                          "meta_info": "step1"}, ("medqa", OPTS, ("B",), "a biguanide", "step1")),
    "medqa answer text": ({"question": "Q", "options": OPTS, "answer": "A loop diuretic"},
                          ("medqa", OPTS, ("C",), "a loop diuretic", None)),
    "medqa answer text that looks like letters": (
        {"question": "Q", "options": {"A": "ARB", "B": "ACE", "C": "band", "D": "CCB", "E": "BB"}, "answer": "ACE"},
        ("medqa", {"A": "ARB", "B": "ACE", "C": "band", "D": "CCB", "E": "BB"}, ("B",), "ACE", None)),
    "medqa multi (CMExam)": ({"question": "Q", "options": OPTS, "answer": "ACD", "subject": "pharm"},
                             ("medqa", OPTS, ("A", "C", "D"), "a statin; a loop diuretic; a beta blocker", "pharm")),
    "medqa options list": ({"question": "Q", "options": list(OPTS.values()), "answer_idx": ["D", "b"]},
                           ("medqa", OPTS, ("B", "D"), "a biguanide; a beta blocker", None)),
    "medmcqa letter cop": ({"question": "Q", "opa": "a statin", "opb": "a biguanide", "opc": "a loop diuretic",
                            "opd": "a beta blocker", "cop": "d", "subject_name": "Pharmacology"},
                           ("medmcqa", OPTS, ("D",), "a beta blocker", "Pharmacology")),
    "list index": ({"question": "Q", "choices": list(OPTS.values()), "answer": 2},
                   ("list", OPTS, ("C",), "a loop diuretic", None)),
    "list letter": ({"question": "Q", "choices": list(OPTS.values()), "answer": "A", "category": "x"},
                    ("list", OPTS, ("A",), "a statin", "x")),
    "list arc-style": ({"question": "Q", "choices": {"label": list("ABCD"), "text": list(OPTS.values())},
                        "answer": 1}, ("list", OPTS, ("B",), "a biguanide", None)),
    "pubmedqa": ({"question": "Q", "context": {"contexts": ["c1", "c2"]}, "final_decision": "Maybe"},
                 ("pubmedqa", {"A": "yes", "B": "no", "C": "maybe"}, ("C",), "maybe", None)),
    "pubmedqa original keys": ({"QUESTION": "Q", "CONTEXTS": ["c"], "final_decision": "no"},
                               ("pubmedqa", {"A": "yes", "B": "no", "C": "maybe"}, ("B",), "no", None)),
    "alpaca": ({"instruction": "Q", "input": "x", "output": "R"}, ("instruction", {}, (), "R", None)),
    "sharegpt": ({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q1"},
                                    {"from": "gpt", "value": "R1"}, {"from": "human", "value": "Q"},
                                    {"from": "gpt", "value": "R"}]}, ("instruction", {}, (), "R", None)),
    "messages": ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "R"}]},
                 ("instruction", {}, (), "R", None)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_format_is_detected_per_record(name):
    record, (fmt, options, gold, reference, subject) = CASES[name]
    item = parse_eval_record(record, "f.jsonl:3", cop_base=0)
    assert item.format == fmt and dict(item.options) == options and item.answer == gold
    assert item.reference == reference and item.subject == subject and item.where == "f.jsonl:3"
    assert item.is_choice == bool(options) and item.is_multi == (len(gold) > 1)
    if name == "sharegpt":  # earlier turns stay as context, the last user turn is the question
        assert item.question == "Q" and [m["content"] for m in item.messages] == ["S", "Q1", "R1"]
    if name == "alpaca":
        assert item.question == "Q\n\nx"
    if name.startswith("pubmedqa"):
        assert item.context.startswith("c")


def test_a_file_mixes_formats_and_keyed_json_objects_are_read(tmp_path):
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [r for r, _ in CASES.values() if "cop" not in r])
    items = load_eval_items(mixed)
    assert [i.where for i in items][:2] == [f"{mixed}:1", f"{mixed}:2"]
    keyed = tmp_path / "ori_pqal.json"  # PubMedQA's original layout: {pmid: record}
    keyed.write_text(json.dumps({"123": {"QUESTION": "Q", "CONTEXTS": ["c"], "final_decision": "yes"},
                                 "456": {"QUESTION": "Q2", "CONTEXTS": ["d"], "final_decision": "no"}}, indent=1))
    items = load_eval_items(keyed)
    assert [(i.id, i.answer) for i in items] == [("123", ("A",)), ("456", ("B",))]


@pytest.mark.parametrize("cops, base, gold", [([0, 2, 1], 0, ["A", "C", "B"]), ([4, 2, 1], 1, ["D", "B", "A"])])
def test_medmcqa_cop_base_is_decided_per_file(tmp_path, cops, base, gold):
    rows = [{"question": f"Q{i}", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": c} for i, c in enumerate(cops)]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    assert [i.answer[0] for i in load_eval_items(path)] == gold
    assert [i.answer[0] for i in load_eval_items(path, cop_base=base)] == gold


def test_ambiguous_medmcqa_cop_asks_for_cop_base(tmp_path):
    rows = [{"question": "Q", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": c} for c in (1, 2)]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(DataFormatError, match="ambiguous.*cop_base"):
        load_eval_items(path)
    assert [i.answer[0] for i in load_eval_items(path, cop_base=1)] == ["A", "B"]


MALFORMED = [
    ({"question": "Q", "options": OPTS, "answer_idx": "E"}, r"\"answer_idx\" 'E' is neither an option letter"),
    ({"question": "Q", "options": OPTS}, r"without \"answer_idx\" or \"answer\""),
    ({"question": "Q", "options": OPTS, "answer_idx": "A", "answer": "a biguanide"},
     r"\"answer\" 'a biguanide' is not the text of option A"),
    ({"question": "", "choices": ["x", "y"], "answer": 0}, r"\"question\" must be a non-empty string"),
    ({"question": "Q", "choices": ["x"], "answer": 0}, r"at least 2 options"),
    ({"question": "Q", "choices": ["x", "y"], "answer": 5}, r"out of range for 2 options"),
    ({"question": "Q", "context": "c", "final_decision": "probably"}, r"yes, no or maybe"),
    ({"question": "Q", "opa": "x", "opb": "y", "cop": 1}, r"without \['opc', 'opd'\]"),
    ({"question": "Q", "options": OPTS, "choices": ["x"], "answer": 0}, r"fits several formats"),
    ({"prompt": "Q", "completion": "R"}, r"unknown evaluation record: expected MedQA-style"),
    ({"conversations": [{"from": "doctor", "value": "x"}]}, r"unknown \"from\" 'doctor'"),
    ([1, 2], r"a record must be a JSON object"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A1"},
                        {"from": "gpt", "value": "A2"}]},
     r"must follow a user turn"),
]


@pytest.mark.parametrize("record, message", MALFORMED, ids=[m[:30] for _, m in MALFORMED])
def test_malformed_records_give_one_line_errors_naming_file_and_line(tmp_path, record, message):
    good = {"question": "Q", "choices": ["x", "y"], "answer": 1}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, record])
    with pytest.raises(DataFormatError, match=message) as info:
        load_eval_items(path, cop_base=1)
    text = str(info.value)
    assert text.startswith(f"{path}:3: ") and "\n" not in text


def test_invalid_json_and_missing_subject_field(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"question": "Q", "choices": ["x", "y"], "answer": 1}\n{"question": \n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=rf"^{path}:2: invalid JSON"):
        load_eval_items(path)
    good = write_jsonl(tmp_path / "good.jsonl", [{"question": "Q", "choices": ["x", "y"], "answer": 1}])
    with pytest.raises(DataFormatError, match="no record has the subject field 'topic'"):
        load_eval_items(good, subject_field="topic")


def test_the_embedded_held_out_set_is_60_medqa_items_over_four_subjects():
    from medcare.cli.demo import HELD_OUT_MC, data_file

    items = load_eval_items(data_file(HELD_OUT_MC))
    assert len(items) == 60 and {i.format for i in items} == {"medqa"}
    assert all(len(i.options) == 4 and len(i.answer) == 1 for i in items)
    assert len({i.subject for i in items}) == 4
