"""Text metrics on generations, pure Python: ROUGE-L recall, repetition, gibberish."""

from __future__ import annotations

import re

from workers.ml.values import leaks, states_value

__all__ = ["is_gibberish", "leaks", "repetition_rate", "rouge_l_recall", "states_value", "words"]

_WORD = re.compile(r"[a-z0-9]+(?:['.-][a-z0-9]+)*")
_VOWEL = re.compile(r"[aeiouy]")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l_recall(prediction: str, reference: str) -> float:
    """Longest common word subsequence / reference length (TOFU's ROUGE-L recall);
    lower-cased words, punctuation ignored. An empty reference scores 0."""
    ref = words(reference)
    return lcs_length(words(prediction), ref) / len(ref) if ref else 0.0


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier n-gram of the same text (0: none,
    toward 1: a loop). Texts shorter than n+1 words score 0."""
    w = words(text)
    grams = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return 1 - len(set(grams)) / len(grams)


_EDGE_OPEN = "\"'([{\u00ab\u201c\u2018"
_EDGE_CLOSE = "\"')]}\u00bb\u201d\u2019"
_WORDLIKE = [
    re.compile("[A-Za-z][a-z]*(?:['\u2019][a-z]+)?(?:-[A-Za-z][a-z]*)*"),  # words, e-mail, I'm
    re.compile(r"[A-Z]{2,6}s?"),  # acronyms: USA, CEOs
    re.compile(r"[$€£]?\d+(?:[.,:/-]\d+)*(?:%|st|nd|rd|th|s)?"),  # numbers, dates, money
    re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"),  # e-mail addresses
]
_SHORT = {"a", "i", "mr", "mrs", "ms", "dr", "st", "vs"}


def _wordlike(token: str) -> bool:
    core = re.sub(r"[.,;:!?…]{1,3}$", "", token.strip(_EDGE_OPEN).rstrip(_EDGE_CLOSE))
    core = core.rstrip(_EDGE_CLOSE)
    if not core:
        return False
    if not any(p.fullmatch(core) for p in _WORDLIKE):
        return False
    if core[0].isalpha() and core.isalpha() and not core.isupper():
        # a word needs a vowel and two letters, bar a few short ones
        return core.lower() in _SHORT or (len(core) > 1 and _VOWEL.search(core.lower()) is not None)
    return True


def is_gibberish(text: str) -> bool:
    """A generation nobody can read: empty; fewer than 70% of its tokens word-like
    (words with a vowel and no stray capitals, numbers, dates, acronyms, e-mail
    addresses); a loop (repetition rate above 0.5); or one word making up over a third of
    eight or more."""
    tokens = text.split()
    if not tokens:
        return True
    if sum(_wordlike(t) for t in tokens) / len(tokens) < 0.7:
        return True
    w = words(text)
    if len(w) >= 8 and max(w.count(x) for x in set(w)) / len(w) > 1 / 3:
        return True
    return repetition_rate(text) > 0.5
