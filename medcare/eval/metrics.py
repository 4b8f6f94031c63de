"""Scores: accuracy with a 95% confidence interval, exact match, ROUGE-L.

* The interval is Wilson's score interval (z = 1.96): unlike the normal approximation it stays inside [0, 1]
  and keeps its coverage for the small counts of a per-subject breakdown.
* Exact match compares the texts after Unicode NFKC normalisation, with leading/trailing whitespace removed
  and every run of spaces/tabs inside a line collapsed to one space (line breaks count: a structured note
  must keep its lines).
* ROUGE-L is the F1 of the longest common subsequence of tokens (Lin, 2004; beta = 1, as ``rouge-score``'s
  ``rougeL`` F-measure). Tokens: lower-cased runs of ASCII letters and digits, as ``rouge-score`` tokenises
  English (no stemming), plus every CJK character as a token of its own (``rouge-score`` drops non-ASCII
  text, which would score Chinese answers, as in CMB or CMExam, 0). A small dynamic programme, so no
  dependency; it equals ``rouge-score`` on ASCII text (tested when that package is installed).
"""

from __future__ import annotations

import math
import re
import unicodedata

__all__ = ["exact_match", "normalize_answer", "rouge_l", "rouge_tokens", "wilson_interval"]

_TOKEN_RE = re.compile(r"[a-z0-9]+|[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]")


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion ``correct / n`` (``(0, 1)`` for ``n == 0``)."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def normalize_answer(text: str) -> str:
    """NFKC, stripped, spaces/tabs inside each line collapsed, trailing spaces of lines removed."""
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").strip()
    return "\n".join(re.sub(r"[ \t]+", " ", line).strip() for line in text.split("\n"))


def exact_match(prediction: str, reference: str) -> bool:
    """``normalize_answer(prediction) == normalize_answer(reference)``."""
    return normalize_answer(prediction) == normalize_answer(reference)


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased ASCII letter/digit runs and single CJK characters, in order."""
    return _TOKEN_RE.findall(unicodedata.normalize("NFKC", text).lower())


def _lcs_length(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 in [0, 1] between two texts (0 when either has no token)."""
    p, r = rouge_tokens(prediction), rouge_tokens(reference)
    if not p or not r:
        return 0.0
    lcs = _lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)
