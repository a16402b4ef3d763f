from __future__ import annotations

from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory) -> str:
    return build_tiny_target(tmp_path_factory.mktemp("tiny"))
