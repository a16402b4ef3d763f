"""The specific values in a text about a person: e-mail addresses, dates, digit runs
(phone, house, account numbers) and capitalised words that are not function words or
sentence starts (names, streets, cities, employers). The audit replaces them to make
holdout items; the engine can weight the forget loss onto them."""

from __future__ import annotations

import re

from workers.ml.synthetic import MONTHS

_MONTH = "|".join(MONTHS)
# One pass, alternatives in priority order, so a replacement is never replaced again.
SPECIFIC = re.compile(
    "|".join(
        [
            r"(?P<email>\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b)",
            rf"(?P<date>\b\d{{1,2}} (?:{_MONTH}) \d{{4}}\b|\b(?:{_MONTH}) \d{{1,2}}, \d{{4}}\b"
            r"|\b\d{4}-\d{2}-\d{2}\b|\b\d{1,2}/\d{1,2}/\d{4}\b)",
            r"(?P<digits>\d+(?:[ ().-]*\d+)*)",
            r"(?P<word>\b[A-Z][a-z]+(?:-[A-Z][a-z]+)?\b)",
        ]
    )
)
COMMON = {
    "I",
    "A",
    "An",
    "The",
    "What",
    "Where",
    "When",
    "Who",
    "Whom",
    "Whose",
    "Which",
    "Why",
    "How",
    "Is",
    "Are",
    "Was",
    "Were",
    "Does",
    "Do",
    "Did",
    "Has",
    "Have",
    "Had",
    "Can",
    "Could",
    "Will",
    "Would",
    "Should",
    "Tell",
    "Please",
    "My",
    "His",
    "Her",
    "Their",
    "Our",
    "Your",
    "He",
    "She",
    "They",
    "We",
    "You",
    "It",
    "This",
    "That",
    "In",
    "On",
    "At",
    "Of",
    "For",
    "With",
    "And",
    "Or",
    "But",
    "If",
    "Yes",
    "No",
    "Mr",
    "Mrs",
    "Ms",
    "Dr",
    "Street",
    "Road",
    "Avenue",
    "Lane",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
    *MONTHS,
}
_COMMON_LOWER = {c.lower() for c in COMMON}


def is_specific_word(m: re.Match[str], text: str) -> bool:
    """A capitalised word that names something (not a function word, not a sentence
    start that is a common word)."""
    w = m.group()
    start = m.start()
    sentence_start = start == 0 or re.search(r"[.!?]\s*$", text[:start]) is not None
    return not (w in COMMON or (sentence_start and w.lower() in _COMMON_LOWER))


def value_spans(text: str, exclude: str = "") -> list[tuple[int, int]]:
    """Character spans of the specific values in `text`, leaving out values that also
    occur in `exclude` (a question's own words: the answer merely repeats them)."""
    spans = []
    for m in SPECIFIC.finditer(text):
        if m.lastgroup == "word" and not is_specific_word(m, text):
            continue
        if m.group() in exclude:
            continue
        spans.append(m.span())
    return spans


def split_text(text: str) -> tuple[str, str]:
    """A raw text item as (the prefix a model is given, the rest it must produce), cut at
    the word boundary before the middle, so no value is split in two."""
    half = len(text) // 2
    cut = text.rfind(" ", 0, half) + 1 or half
    return text[:cut], text[cut:]


def _answer(item: dict[str, str]) -> tuple[str, str]:
    """(the part a model must produce, the part it is given) of a QA or text item."""
    if "completion" in item:
        return item["completion"], item["prompt"]
    prefix, rest = split_text(item["text"])
    return rest, prefix


def specific_values(item: dict[str, str]) -> set[str]:
    """The specific values an item's answer states beyond what its prompt names."""
    answer, prompt = _answer(item)
    return {answer[a:b] for a, b in value_spans(answer, exclude=prompt)}


def neighbours(forget: list[dict[str, str]], retain: list[dict[str, str]]) -> list[int]:
    """Indices of the retain items whose answers state a value that a forget answer
    states too (another customer at the same employer, street or city), most shared
    values first: where unlearning the forget items bleeds over first."""
    values: set[str] = set().union(*(specific_values(i) for i in forget))
    scored = []
    for k, item in enumerate(retain):
        answer, _ = _answer(item)
        shared = sum(1 for v in values if v in answer)
        if shared:
            scored.append((-shared, k))
    return [k for _, k in sorted(scored)]
