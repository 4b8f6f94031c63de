"""Wilson intervals, exact match and ROUGE-L against hand-computed values (and rouge-score when installed)."""

from __future__ import annotations

import math
import random

import pytest

from medcare.eval.metrics import exact_match, normalize_answer, rouge_l, rouge_tokens, wilson_interval


@pytest.mark.parametrize("correct, n", [(0, 10), (10, 10), (7, 20), (1, 1), (30, 60)])
def test_wilson_interval_matches_the_formula_and_stays_in_range(correct, n):
    lo, hi = wilson_interval(correct, n)
    p, z = correct / n, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert lo == pytest.approx(max(0, centre - half)) and hi == pytest.approx(min(1, centre + half))
    assert 0 <= lo <= p <= hi <= 1
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_known_wilson_value():
    lo, hi = wilson_interval(5, 10)  # a textbook value: 0.2366, 0.7634
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)


def test_exact_match_normalises_spaces_but_keeps_lines():
    note = "TRIAGE NOTE\nAcuity: ESI 2 (emergent)"
    assert exact_match("  TRIAGE  NOTE \nAcuity:  ESI 2 (emergent)\n", note)
    assert not exact_match("TRIAGE NOTE Acuity: ESI 2 (emergent)", note)
    assert not exact_match("triage note\nAcuity: ESI 2 (emergent)", note)
    assert normalize_answer("ａ\r\nb") == "a\nb"


@pytest.mark.parametrize("pred, ref, expected", [
    ("the cat sat", "the cat sat", 1.0),
    ("the cat", "the cat sat on the mat", 2 * (1 * 2 / 6) / (1 + 2 / 6)),  # P=1, R=1/3
    ("sat the cat", "the cat sat", 2 / 3),                                # LCS "the cat": P=R=2/3
    ("a b c d", "x y", 0.0), ("", "x", 0.0),
    ("Metformin, a Biguanide!", "metformin a biguanide", 1.0),          # case and punctuation ignored
    ("二甲双胍是双胍类", "二甲双胍属于双胍类", 14 / 17),  # CJK per character: LCS 7 of 8 and 9
])
def test_rouge_l_by_hand(pred, ref, expected):
    assert rouge_l(pred, ref) == pytest.approx(expected)


def test_rouge_tokens():
    assert rouge_tokens("HbA1c 7.5% 高血压") == ["hba1c", "7", "5", "高", "血", "压"]


def test_rouge_l_equals_rouge_score_on_english():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    words = "the patient has chest pain fever cough ecg troponin within ten minutes of arrival".split()
    rng = random.Random(0)
    for _ in range(50):
        a = " ".join(rng.choices(words, k=rng.randint(1, 12)))
        b = " ".join(rng.choices(words, k=rng.randint(1, 12)))
        assert rouge_l(a, b) == pytest.approx(scorer.score(b, a)["rougeL"].fmeasure), (a, b)
