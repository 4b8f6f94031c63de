"""Answer letters from generated replies: explicit phrases, leading letters, multi-answer runs, option texts,
and the prose that must not be read as a letter."""

from __future__ import annotations

import pytest

from medcare.eval import extract_letters

OPTIONS = [("A", "a biguanide"), ("B", "a statin"), ("C", "an ACE inhibitor"), ("D", "a loop diuretic"),
           ("E", "a nonsteroidal anti-inflammatory drug")]

SINGLE = [
    ("B", "B"), ("B.", "B"), ("b.", "B"), ("B) a statin", "B"), ("(C)", "C"), ("( B )", "B"), ("**B**", "B"),
    ("Ｂ", "B"),  # full-width
    ("The answer is C.", "C"), ("Answer: D", "D"), ("answer: b", "B"), ("The correct option is (D).", "D"),
    ("I think the answer is B because statins lower LDL.", "B"), ("Option B is correct", "B"),
    ("B is correct", "B"), ("D - loop diuretic", "D"), ("Not A. The answer is C", "C"),
    ("答案：B", "B"), ("答案是 E", "E"), ("选C", "C"), ("so I pick (C) here", "C"),
    ("It is a biguanide.", "A"),  # no letter: the text of exactly one option
    ("It is an ACE inhibitor", "C"),  # "ACE" is a word, not the letters A, C, E
    ("It is a nonsteroidal anti-inflammatory drug", "E"),
    # nothing readable
    ("A patient with chest pain needs an ECG", None), ("ACE inhibitors are first line", None),
    ("the answer is a vitamin K antagonist", None), ("The answer is Apixaban", None), ("answer is F", None),
    ("a statin or a biguanide", None),  # two options named: no single answer
    ("The options are: A. x", None), ("", None), ("   ", None),
]


@pytest.mark.parametrize("text, expected", SINGLE)
def test_single_answer_letters(text, expected):
    got = extract_letters(text, "ABCDE", OPTIONS, multi=False)
    assert got == (tuple(expected) if expected else None), text


MULTI = [
    ("ACD", "ACD"), ("AC.", "AC"), ("A, C and D", "ACD"), ("A，C，D", "ACD"), ("A/C", "AC"),
    ("正确答案是ACD", "ACD"), ("The answers are B and E.", "BE"), ("answers: A, C", "AC"),
    ("DA", "AD"),  # sorted
    ("a statin and a loop diuretic", "BD"),  # option texts, several allowed for a multi-answer item
]


@pytest.mark.parametrize("text, expected", MULTI)
def test_multi_answer_letters(text, expected):
    assert extract_letters(text, "ABCDE", OPTIONS, multi=True) == tuple(expected), text


def test_only_the_items_letters_count():
    assert extract_letters("E", "ABCD") is None
    assert extract_letters("The answer is E", "ABCDE") == ("E",)
    assert extract_letters("It is a statin.", "ABCD") is None  # no options given: no text rule
