"""Data files for ``medcare train``: both formats in JSON and JSONL, malformed input named by line or record,
response-only labels with a chat template and with the plain template, truncation, the collator."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from medcare.data import (
    IGNORE_INDEX,
    DataFormatError,
    build_dataset,
    load_records,
    make_collator,
    prompt_text,
    tokenize_messages,
)
from medcare.data.formats import parse_record
from tests.cli.conftest import write_jsonl

ALPACA = [
    {"instruction": "What class of drug is warfarin?", "input": "", "output": "A vitamin K antagonist."},
    {"instruction": "Summarise the note.", "input": "Fever and cough for 3 days.", "output": "Probable infection.",
     "system": "You are a clinician."},
]
SHAREGPT = [
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Q1"},
                       {"from": "gpt", "value": "A1"}, {"from": "human", "value": "Q2"},
                       {"from": "gpt", "value": "A2"}, {"from": "human", "value": "trailing"}]},
]
EXPECTED = [
    [{"role": "user", "content": "What class of drug is warfarin?"},
     {"role": "assistant", "content": "A vitamin K antagonist."}],
    [{"role": "system", "content": "You are a clinician."},
     {"role": "user", "content": "Summarise the note.\n\nFever and cough for 3 days."},
     {"role": "assistant", "content": "Probable infection."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
     {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
     {"role": "assistant", "content": "A2"}],  # the trailing user turn has no response: dropped
]


@pytest.mark.parametrize("layout", ["jsonl", "json-array", "json-with-lines"])
def test_both_formats_load_as_chat_messages(tmp_path, layout):
    records = ALPACA + SHAREGPT
    if layout == "json-array":
        path = tmp_path / "data.json"
        path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    else:
        path = write_jsonl(tmp_path / ("data.jsonl" if layout == "jsonl" else "data.json"), records)
    examples = load_records(path)
    assert [ex.messages for ex in examples] == EXPECTED
    if layout == "json-array":
        assert examples[3].where.endswith("data.json record 3")
    else:
        assert examples[3].where.endswith(":4")


def test_openai_messages_format_is_read_too():
    msgs = parse_record({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
                        "r")
    assert msgs == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


MALFORMED_LINES = [
    ('{"instruction": "Q", "output": "A"', "invalid JSON"),
    ("[1, 2]", "a record must be a JSON object"),
    ('{"question": "Q", "answer": "A"}', "unknown record format"),
    ('{"instruction": "Q"}', 'Alpaca record without "output"'),
    ('{"instruction": "", "output": "A"}', '"instruction" must be a non-empty string'),
    ('{"instruction": "Q", "input": 3, "output": "A"}', '"input" must be a string'),
    ('{"conversations": []}', '"conversations" must be a non-empty list'),
    ('{"conversations": [{"from": "doctor", "value": "Q"}]}', 'unknown "from" \'doctor\''),
    ('{"conversations": [{"from": "human"}]}', '"conversations"[0] must be an object with "from" and "value"'),
    ('{"conversations": [{"from": "human", "value": "Q"}]}', "has no assistant turn"),
    ('{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "  "}]}',
     '"conversations"[1] (gpt): "value" must be a non-empty string'),
    (('{"conversations": [{"from": "human", "value": "Q"}, {"from": "system", "value": "S"}, '
     '{"from": "gpt", "value": "A"}]}'), "a system turn may only come first"),
    ('{"conversations": [{"from": "gpt", "value": "A"}]}', "must start with a user turn"),
    ('{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], "instruction": "Q"}',
     "use one format per record"),
]


@pytest.mark.parametrize("line,message", MALFORMED_LINES, ids=[m for _, m in MALFORMED_LINES])
def test_malformed_jsonl_record_names_its_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(ALPACA[0])
    path.write_text(f"{good}\n\n{good}\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as info:
        load_records(path)
    assert str(info.value).startswith(f"{path}:4: "), str(info.value)
    assert message in str(info.value)


def test_malformed_json_array_names_record_and_syntax_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([ALPACA[0], ALPACA[1], {"instruction": "Q"}], indent=1), encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.json record 2: Alpaca record without \"output\""):
        load_records(path)
    path.write_text('[\n {"instruction": "Q", "output": "A"},\n {"instruction": "Q" "output": "A"}\n]\n')
    with pytest.raises(DataFormatError, match=r"bad\.json:3: invalid JSON: Expecting ',' delimiter"):
        load_records(path)


def test_unreadable_files(tmp_path):
    with pytest.raises(DataFormatError, match="no such file"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataFormatError, match="no records"):
        load_records(tmp_path / "empty.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(ALPACA[0]).encode() + b"\n" + '{"instruction": "caf\xe9"}'
                                            .encode("latin-1") + b"\n")
    with pytest.raises(DataFormatError, match=r"latin1\.jsonl:2: not UTF-8"):
        load_records(tmp_path / "latin1.jsonl")
    (tmp_path / "object.json").write_text(json.dumps(ALPACA[0], indent=2))
    with pytest.raises(DataFormatError, match=r"object\.json:1: invalid JSON.*one JSON array"):
        load_records(tmp_path / "object.json")


def _response_text(tokenizer, feature):
    return tokenizer.decode([t for t in feature["labels"] if t != IGNORE_INDEX])


def _spans(feature):
    """Runs of consecutive labelled positions."""
    runs, start = [], None
    for i, t in enumerate(feature["labels"] + [IGNORE_INDEX]):
        if t != IGNORE_INDEX and start is None:
            start = i
        elif t == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_labels_cover_only_the_responses_with_the_chat_template(demo_tokenizer):
    tok = demo_tokenizer
    assert tok.chat_template
    f = tokenize_messages(EXPECTED[0], tok)
    assert f["attention_mask"] == [1] * len(f["input_ids"])
    assert [t for t in f["labels"] if t != IGNORE_INDEX] == [t for t, lab in zip(f["input_ids"], f["labels"])
                                                             if lab != IGNORE_INDEX]
    assert _response_text(tok, f) == "A vitamin K antagonist.<|im_end|>"  # the content and the end of turn
    prompt = prompt_text(EXPECTED[0][:1], tok)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert all(t == IGNORE_INDEX for t in f["labels"][:n_prompt])
    assert f["input_ids"][:n_prompt] == tok(prompt, add_special_tokens=False)["input_ids"]
    # multi-turn: both assistant turns, nothing of the system or user turns
    f = tokenize_messages(EXPECTED[3], tok)
    runs = _spans(f)
    assert [tok.decode(f["input_ids"][a:b]) for a, b in runs] == ["A1<|im_end|>", "A2<|im_end|>"]


def test_labels_cover_only_the_responses_with_the_plain_template(demo_tokenizer):
    tok = copy.deepcopy(demo_tokenizer)
    tok.chat_template = None
    f = tokenize_messages(EXPECTED[1], tok)
    text = tok.decode(f["input_ids"])
    assert text == ("You are a clinician.\n\n### Instruction:\nSummarise the note.\n\nFever and cough for 3 days."
                    "\n\n### Response:\nProbable infection.<|im_end|>")
    assert _response_text(tok, f) == "Probable infection.<|im_end|>"
    f = tokenize_messages(EXPECTED[3], tok)
    assert [tok.decode(f["input_ids"][a:b]) for a, b in _spans(f)] == ["A1<|im_end|>", "A2<|im_end|>"]
    assert prompt_text(EXPECTED[0][:1], tok).endswith("### Response:\n")
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_messages(EXPECTED[0], tok, template="chat")


def test_truncation_drops_examples_without_a_response_token(demo_tokenizer, demo_examples):
    examples = demo_examples["stage2"][:3]
    full = build_dataset(examples, demo_tokenizer, max_length=None)
    prompts = [f["labels"].index(next(t for t in f["labels"] if t != IGNORE_INDEX)) for f in full.features]
    cut = build_dataset(examples, demo_tokenizer, max_length=max(prompts) + 3)
    assert cut.num_truncated == 3 and len(cut) == 3 and cut.num_dropped == 0
    assert all(len(f["input_ids"]) == max(prompts) + 3 for f in cut.features)
    assert all(f["labels"][:n] == [IGNORE_INDEX] * n for f, n in zip(cut.features, prompts))
    with pytest.warns(UserWarning, match="1 of 3 examples have no response token within max_length"):
        short = build_dataset(demo_examples["stage1"][:2] + examples[:1], demo_tokenizer, max_length=prompts[0] - 1)
    assert len(short) == 2 and short.num_dropped == 1
    with pytest.raises(DataFormatError, match="no example keeps a response token"):
        build_dataset(examples, demo_tokenizer, max_length=4)


def test_chat_template_errors_name_the_record(demo_tokenizer, tmp_path):
    tok = copy.deepcopy(demo_tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system "
                         "role') }}{% endif %}{{ m['content'] }}{% endfor %}")
    path = write_jsonl(tmp_path / "d.jsonl", ALPACA)
    with pytest.raises(DataFormatError, match=r"d\.jsonl:2: the tokenizer's chat template failed.*no system role"):
        build_dataset(path, tok)


def test_collator_pads_on_the_right_with_ignored_labels(demo_tokenizer):
    feats = [tokenize_messages(EXPECTED[0], demo_tokenizer), tokenize_messages(EXPECTED[3], demo_tokenizer)]
    batch = make_collator(demo_tokenizer)(copy.deepcopy(feats))
    n0, n1 = len(feats[0]["input_ids"]), len(feats[1]["input_ids"])
    assert batch["input_ids"].shape == (2, max(n0, n1)) and n0 < n1
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (n1 - n0)
    assert batch["labels"][0, n0:].eq(IGNORE_INDEX).all()
    assert batch["input_ids"][0, n0:].eq(demo_tokenizer.pad_token_id).all()
    assert batch["labels"][0, :n0].tolist() == feats[0]["labels"]
    assert batch["labels"].dtype == torch.long


def test_the_demo_tokenizer_reloads_identically_next_to_a_qwen2_config(tiny_model_dir, demo_tokenizer,
                                                                        demo_examples):
    """transformers 5 loads a tokenizer saved next to a Qwen2 config as Qwen2Tokenizer, which rebuilds its own
    pre-tokenizer: the demo's must be built the same way, or a saved model sees other token ids."""
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = demo_examples["stage1"][:20] + demo_examples["stage2"][:20] + demo_examples["held_out"]
    assert build_dataset(examples, reloaded).features == build_dataset(examples, demo_tokenizer).features
    assert reloaded.eos_token == "<|im_end|>" and reloaded.pad_token == demo_tokenizer.pad_token
