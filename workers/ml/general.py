"""General retain items: everyday questions answered by the job's own reference model.

A job's retain data says what to keep about other people, not what to keep about the
world. Pushing a person's places and names away moved a small model's answers to
unrelated questions towards other fictitious values ("Mexico's capital is Port
Avery"), and the retain term could not see it. With these items in the retain data
(one per retain batch, on top of the caller's items), the KL (or NLL) retain term also
holds the model's own answers to general questions (docs/engine.md, "General retain").

The questions are disjoint from the audit's general-knowledge probe
(`data/general_knowledge.json`, a test checks it), so the audit still measures
knowledge the job never trained on. The answers are the reference's greedy answers,
right or wrong: the job keeps behaviour, it does not teach facts.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from workers.ml.evaluate import greedy_answers

# Room for a one-sentence answer; a longer one is cut, which the retain term does not mind.
ANSWER_TOKENS = 32


def questions() -> list[str]:
    """The shipped general questions, in a fixed order."""
    text = resources.files("workers.ml").joinpath("data/general_prompts.json").read_text()
    return list(json.loads(text))


def reference_items(model: Any, tok: Any, count: int) -> list[dict[str, str]]:
    """QA items of the first `count` questions with `model`'s greedy answers (the model
    as the job loaded it: the base, or the previous adapter version in a chain), those
    with an empty answer left out."""
    asked = questions()[:count]
    if not asked:
        return []
    answers = greedy_answers(model, tok, asked, max_new_tokens=ANSWER_TOKENS)
    return [{"prompt": q, "completion": a} for q, a in zip(asked, answers, strict=True) if a]
