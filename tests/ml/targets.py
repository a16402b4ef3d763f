"""The tiny fine-tuned target and the items tests unlearn from it (fictitious people)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.ml import tiny
from workers.ml import synthetic
from workers.ml.finetune import finetune

PEOPLE = synthetic.people(6, seed=3)
FORGET = synthetic.qa_items(PEOPLE[0])[:8]
FORGET_B = synthetic.qa_items(PEOPLE[1])[:8]
RETAIN = [i for p in PEOPLE[2:] for i in synthetic.qa_items(p)[:4]]


def build_tiny_target(root: Path) -> str:
    """A tiny random Llama fine-tuned until it knows the forget and retain items
    (forget probability about 0.8): something real to unlearn, in about a second."""
    base = tiny.build(root / "base")
    out = root / "target"
    finetune(str(base), FORGET + FORGET_B + RETAIN, out, epochs=20, lr=3e-3, batch_size=8)
    return str(out)


# The audit policy of the tiny target. A two-layer model overfit to 40 facts gives
# never-seen names about 0.4% probability (measured: holdout probability 0.004), far
# below anything an unlearning run within the retain bound reaches (0.02-0.14), so its
# membership AUC stays near 1 whatever the run does: the privacy criterion cannot be met
# by this toy and is opened up; every other criterion keeps its default.
TINY_AUDIT_POLICY = {"max_mia_deviation": 0.5}

# The same toy cannot keep every retain answer word for word while it unlearns: its
# retain answers break within the steps that move the forget items (the answer guard then
# rolls the run back to step 0 and nothing is forgotten). Tests that unlearn it end to
# end switch the answer guard off; test_methods tests the guard itself on this target.
TINY_ANSWER_GUARD_OFF = {"retain_answers_tolerance": None}


def cancel_after(steps: int) -> Callable[[], bool]:
    """A `should_cancel` that lets `steps` steps run (it is asked before each one)."""
    calls = {"n": 0}

    def should_cancel() -> bool:
        calls["n"] += 1
        return calls["n"] > steps

    return should_cancel
