"""Whether the forget items' greedy answers still state their values: the audit's
value-leak rule (`forget_value_leak`, workers/audit/run.py) applied by the engine to the
state it is about to stop at (`stop_answers_leak`, docs/engine.md, "Scope control").

The scope check's own value test is teacher-forced (every value token the top choice
after the reference's own prefix); a greedy answer can take another path to the same
value ("lives at 14 Elm Road" for "her address is 14 Elm Road"), and a run that stops
where the teacher-forced test first passes stops on the audit's edge."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workers.ml.data import Encoded, prompts_and_references
from workers.ml.evaluate import answer_budget, greedy_from_ids
from workers.ml.values import leaks, specific_values


@dataclass
class _Answers:
    index: list[int]  # the items whose answers state values, only
    prompts: list[list[int]]
    values: list[set[str]]


def _answers(
    tok: Any, items: list[dict[str, str]], encoded: list[Encoded], index: list[int] | None = None
) -> _Answers | None:
    """`index`: the items' own indices (a sample's, in its set), else their positions."""
    prompts, _ = prompts_and_references(tok, items, encoded)
    values = [specific_values(i) for i in items]
    keep = [k for k, v in enumerate(values) if v]
    if not keep:
        return None
    at = index or list(range(len(items)))
    return _Answers([at[k] for k in keep], [prompts[k] for k in keep], [values[k] for k in keep])


@dataclass
class AnswerCheck:
    """The forget items' answers, and the holdout items' (data of the same kind about
    no real person): the audit allows as many leaks above the holdout's own share
    (values a model states by chance: a common city, a popular employer). And the retain
    sample's (`stop_answers_kept`): the audit counts those that stop stating their
    values."""

    tok: Any
    forget: _Answers
    holdout: _Answers | None
    max_new_tokens: int
    retain: _Answers | None = None

    @classmethod
    def build(
        cls,
        tok: Any,
        forget: tuple[list[dict[str, str]], list[Encoded]],
        holdout: tuple[list[dict[str, str]], list[Encoded]],
    ) -> AnswerCheck | None:
        """None when no forget item states a value: nothing could leak."""
        mine = _answers(tok, *forget)
        if mine is None:
            return None
        return cls(tok, mine, _answers(tok, *holdout), answer_budget(tok, forget[0]))

    def with_retain(
        self, items: list[dict[str, str]], encoded: list[Encoded], index: list[int]
    ) -> AnswerCheck:
        """Also read the retain sample `items` (`index`: theirs in the retain set)."""
        self.retain = _answers(self.tok, items, encoded, index)
        return self

    def _stating(self, model: Any, answers: _Answers) -> list[int]:
        """The `answers.index` items whose greedy answers state their values."""
        said = greedy_from_ids(model, self.tok, answers.prompts, max_new_tokens=self.max_new_tokens)
        pairs = zip(answers.index, said, answers.values, strict=True)
        return [i for i, a, v in pairs if leaks(a, v)]

    def leaking(self, model: Any) -> tuple[list[int], float]:
        """The forget items whose greedy answers state their values (the audit's `leaks`:
        any identifying value, or more than half of the others), and their share of the
        items that state values."""
        found = self._stating(model, self.forget)
        return found, len(found) / len(self.forget.index)

    def chance_share(self, model: Any) -> float:
        """The same share on the holdout items (0 without any that state values)."""
        if self.holdout is None:
            return 0.0
        return len(self._stating(model, self.holdout)) / len(self.holdout.index)

    def retain_stating(self, model: Any) -> list[int]:
        """The retain items (indices in the retain set) whose greedy answers state their
        values by the same rule."""
        return self._stating(model, self.retain) if self.retain is not None else []
