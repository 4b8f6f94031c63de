"""The answer letter(s) of a generated reply to a multiple-choice question.

Rules, first that applies (only letters of the item's options count; full-width letters and markdown bold are
normalised first):

1. An explicit answer phrase: "the answer is B", "Answer: (C)", "correct options are A, C and D",
   "Option B is correct", "答案：B", "正确答案是ACD", "选B". The first phrase with valid letters wins.
2. A leading letter or letter run: "B", "B.", "(B) metformin", "B) ...", "B: ...", "B is correct", "ACD",
   "A, C and D". Not "A patient ..." or "ACE inhibitors" (a letter run followed by a word is prose).
3. Exactly one bracketed letter anywhere: "... so I pick (C)".
4. The text of the options: the reply names exactly one option's text ("It is a biguanide." -> the option
   "a biguanide"), the longest match winning over options it contains. For a multi-answer item, every option
   named.

Returns the sorted letters, or ``None`` when nothing can be read (the item then counts as wrong).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

__all__ = ["extract_letters"]

_SEP = r"(?:\s*(?:,|，|、|/|&|\b(?i:and)\b|和|及)\s*|\s+)"
# letters are case-sensitive (the phrases around them are not): a glued run ("ACD") first, then single letters
# with separators ("A, C and D"); a lone lower-case letter is checked by _accept
_RUN = r"(?:[\(\[（【]\s*)?(?P<letters>[A-Z]{2,}|[A-Za-z](?:" + _SEP + r"[A-Z])*)(?:\s*[\)\]）】])?"
_PHRASES = [
    # "the answer is B", "Answer: (C)", "answers are A, C and D", "the answer would be option C"
    r"answers?\s*(?:is|are|would\s+be|will\s+be|should\s+be)?\s*(?:option|choice)?\s*[:：=\-]?\s*",
    # "the correct option is B", "best choice: C"
    r"(?:correct|right|best|final)\s+(?:option|choice)s?\s*(?:is|are|would\s+be)?\s*[:：=\-]?\s*",
    # "答案：B", "正确答案是ACD", "答案为 C", "选B", "选择C"
    r"答案\s*(?:应该|应)?\s*(?:是|为)?\s*[:：]?\s*(?:选项)?\s*",
    r"选(?:择|项)?\s*",
]
_PHRASE_RES = [re.compile("(?i:" + p + ")" + _RUN + r"(?P<after>.{0,3})", re.DOTALL) for p in _PHRASES]
# "Option B is correct", "choice C is the right one"
_OPTION_IS_RE = re.compile(r"(?i:option|choice)\s+" + _RUN + r"(?i:\s+(?:is|are)\s+(?:the\s+)?(?:correct|right|best))")
_LEADING_RE = re.compile(r"^\s*" + _RUN + r"(?P<after>.*)$", re.DOTALL)
_BRACKETED_RE = re.compile(r"[\(\[（【]\s*([A-Z])\s*[\)\]）】]")
_PUNCT = tuple(".):：,，、。;；]）】!?\n")


def _normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)  # full-width Ａ -> A, （ -> (
    return text.replace("**", "").replace("__", "").strip()


def _split(run: str) -> list[str]:
    return [c for c in re.sub(_SEP, "", run, flags=re.IGNORECASE) if c.isalpha()]


def _accept(run: str, after: str, letters: Sequence[str], leading: bool = False) -> tuple[str, ...] | None:
    """The letters of a candidate run, or None when the run is a word of prose or names no option."""
    if after[:1].isalnum():  # "Apixaban", "ACEi": letters glued to more letters
        return None
    parts = _split(run)
    glued_run = len(parts) > 1 and re.fullmatch(r"[A-Za-z]+", run.strip("()[]（）【】 ")) is not None
    word_follows = re.match(r"\s+[^\W\d_]", after) is not None  # " vitamin", " inhibitors", " patient"
    if word_follows and leading:
        # at the start only "B is correct", "B - metformin", "B (metformin)" go on with words
        word_follows = re.match(r"\s+(is|are|was|would|should)\b", after, re.IGNORECASE) is None
    if any(c.islower() for c in parts):
        # a lower-case letter only alone and not followed by a word: "answer is b", "b." (not "a vitamin")
        if len(parts) > 1 or word_follows:
            return None
    elif word_follows and (glued_run or leading):  # "ACE inhibitors", "A patient"
        return None
    upper = [c.upper() for c in parts]
    if not upper or not all(c in letters for c in upper):
        return None
    return tuple(sorted(set(upper)))


def _from_text(text: str, options: Sequence[tuple[str, str]], multi: bool) -> tuple[str, ...] | None:
    lowered = text.casefold()
    spans = []
    for letter, option in options:
        o = option.strip().casefold()
        if not o:
            continue
        left = r"(?<!\w)" if re.match(r"\w", o[0]) else ""
        right = r"(?!\w)" if re.match(r"\w", o[-1]) else ""
        m = re.search(left + re.escape(o) + right, lowered)
        if m:
            spans.append((m.start(), m.end(), letter))
    # an option whose match lies inside a longer option's match is that longer option's words
    kept = [s for s in spans if not any(o[0] <= s[0] and s[1] <= o[1] and (o[1] - o[0]) > (s[1] - s[0])
                                        for o in spans)]
    chosen = sorted({letter for _, _, letter in kept})
    if not chosen or (len(chosen) > 1 and not multi):
        return None
    return tuple(chosen)


def extract_letters(text: str, letters: Sequence[str] = "ABCD", options: Sequence[tuple[str, str]] = (),
                    multi: bool = False) -> tuple[str, ...] | None:
    """The answer letters in ``text`` (sorted, unique), or ``None``.

    ``letters``: the item's option letters; ``options``: ``[(letter, text), ...]`` for rule 4; ``multi``:
    the item has several correct options (rule 4 may then return several).
    """
    letters = [c.upper() for c in letters]
    t = _normalise(text)
    if not t:
        return None
    for rx in _PHRASE_RES:
        for m in rx.finditer(t):
            got = _accept(m["letters"], m["after"], letters)
            if got:
                return got
    for m in _OPTION_IS_RE.finditer(t):
        got = _accept(m["letters"], "", letters)
        if got:
            return got
    m = _LEADING_RE.match(t)
    if m:
        after = m["after"]
        ok = not after.strip() or after.startswith(_PUNCT) or after[:1].isspace()
        got = _accept(m["letters"], after, letters, leading=True) if ok else None
        if got:
            return got
    bracketed = {c for c in _BRACKETED_RE.findall(t) if c in letters}
    if len(bracketed) == 1:
        return (bracketed.pop(),)
    if options:
        return _from_text(t, options, multi)
    return None
