"""Stand-ins for a person's specific values: the same items with the values replaced by
synthetic ones, so they share the templates but state facts the model never saw.

Two uses:
- `synthesize`: holdout items for a request that brought none (the comparison set of the
  audit's membership-inference test and of the engine's stop rule); names in the
  question are replaced too, so a holdout item is about another, synthetic person.
- `alternatives`: the `relabel` method's training targets: the same question about the
  same person, answered with synthetic values (several stand-in sets), so the model ends
  up as unsure about the person as about someone it never saw.

What counts as a specific value (workers/ml/values.py), replaced in this order,
consistently across all items of one stand-in set (the same original always gets the
same replacement, so "Jane Roe" in a question and in its answer stay one person):
1. e-mail addresses -> `<synthetic name>@example.org`;
2. dates: `4 May 1985`, `May 4, 1985`, `1985-05-04`, `04/05/1985` -> another date of
   the same shape;
3. digit runs (phone numbers, house numbers, account numbers, ages) -> random digits of
   the same length and separators;
4. capitalised words that are not sentence starts or common function words (names,
   streets, cities, employers) -> synthetic words from the name and place lists.
An item in which nothing was replaced is dropped by `synthesize`: it holds nothing
specific to compare.
"""

from __future__ import annotations

import random
import re

from workers.ml.synthetic import CITIES, EMPLOYERS, FIRST, LAST, MONTHS
from workers.ml.values import SPECIFIC, is_specific_word, split_text

_WORDS = [*FIRST, *LAST, *(c.split()[0] for c in CITIES), *(e.split()[0] for e in EMPLOYERS)]


class _Replacer:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.seen: dict[str, str] = {}

    def _once(self, original: str, make: object) -> str:
        if original not in self.seen:
            new = make()  # type: ignore[operator]
            self.seen[original] = new if new != original else make()  # type: ignore[operator]
        return self.seen[original]

    def email(self, m: re.Match[str]) -> str:
        return self._once(
            m.group(),
            lambda: f"{self.rng.choice(FIRST).lower()}.{self.rng.choice(LAST).lower()}@example.org",
        )

    def date(self, m: re.Match[str]) -> str:
        def make() -> str:
            text = m.group()
            year = str(self.rng.randint(1940, 2005))
            month = self.rng.choice(MONTHS)
            day = str(self.rng.randint(1, 28))
            if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
                return f"{year}-{self.rng.randint(1, 12):02d}-{int(day):02d}"
            if "/" in text:
                return f"{int(day):02d}/{self.rng.randint(1, 12):02d}/{year}"
            if text[0].isdigit():
                return f"{day} {month} {year}"
            return f"{month} {day}, {year}"

        return self._once(m.group(), make)

    def digits(self, m: re.Match[str]) -> str:
        def make() -> str:
            return "".join(
                str(self.rng.randint(1 if k == 0 else 0, 9)) if c.isdigit() else c
                for k, c in enumerate(m.group())
            )

        return self._once(m.group(), make)

    def word(self, m: re.Match[str], text: str) -> str:
        if not is_specific_word(m, text):
            return m.group()
        return self._once(m.group(), lambda: self.rng.choice(_WORDS))

    def text(self, text: str, keep: str = "") -> str:
        """`text` with its values replaced, except those that also occur in `keep`."""

        def one(m: re.Match[str]) -> str:
            if keep and m.group() in keep:
                return m.group()
            kind = m.lastgroup
            if kind == "email":
                return self.email(m)
            if kind == "date":
                return self.date(m)
            if kind == "digits":
                return self.digits(m)
            return self.word(m, text)

        return SPECIFIC.sub(one, text)


def synthesize(items: list[dict[str, str]], seed: int = 0) -> list[dict[str, str]]:
    """Holdout versions of `items` (QA or text), deterministic for a seed."""
    rep = _Replacer(seed)
    out = []
    for item in items:
        new = {k: rep.text(v) for k, v in item.items()}
        if new != item:
            out.append(new)
    return out


def alternatives(items: list[dict[str, str]], count: int, seed: int) -> list[list[dict[str, str]]]:
    """For each item, `count` versions whose answer states synthetic values instead of the
    person's (the question is kept; values the question itself names are kept in the
    answer). One stand-in set per version, consistent across items. A raw text item keeps
    its first half (the prompt the model sees) and gets the values of the rest replaced.
    Seeds are offset from `synthesize`'s so the two never produce the same values."""
    sets = [_Replacer(seed * 1_000 + 500 + j) for j in range(count)]
    out = []
    for item in items:
        versions = []
        for rep in sets:
            if "completion" in item:
                versions.append(
                    {
                        "prompt": item["prompt"],
                        "completion": rep.text(item["completion"], keep=item["prompt"]),
                    }
                )
            else:
                prefix, rest = split_text(item["text"])
                versions.append({"text": prefix + rep.text(rest, keep=prefix)})
        out.append(versions)
    return out
