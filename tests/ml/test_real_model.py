"""The real built-in SmolLM2: teach it a fictitious person, unlearn them with the
default method, and check the secrets are gone while general knowledge stays.
Several minutes on 2 CPU cores: `make test-slow`."""

from __future__ import annotations

import pytest
from peft import PeftModel

from workers.ml import evaluate, loading, synthetic
from workers.ml.finetune import finetune
from workers.ml.run import run_job
from workers.ml.specs import JobSpec

pytestmark = pytest.mark.slow


def _hits(model, tok, person) -> tuple[int, list[str]]:
    answers = evaluate.greedy_answers(model, tok, [i["prompt"] for i in synthetic.qa_items(person)])
    return sum(synthetic.revealed(answers, synthetic.item_secrets(person))), answers


@pytest.mark.xfail(
    strict=False,
    reason="measured 2026-11-28 with the first-round default (npo, lr 5e-4, 16 steps): 11 "
    "of the 20 answers about the forgotten person still stated the secret value. The "
    "third-round default leaves 1-2 of 20 on two 8-person benchmark targets "
    "(docs/audit.md); this 3-person target is not re-measured with it yet",
)
def test_unlearning_one_person_on_the_builtin_model(tmp_path):
    people = synthetic.people(3, seed=11)
    items = [i for p in people for i in synthetic.qa_items(p)]
    target = tmp_path / "target"
    finetune("builtin:smollm2-135m-instruct", items, target, epochs=5, lr=1e-4, batch_size=8)

    model, tok = loading.load(loading.resolve(str(target)), loading.pick_placement())
    known, answers = _hits(model, tok, people[0])
    assert known >= 12, answers  # it learned the person (out of 20 questions)
    probe = evaluate.general_knowledge()[:40]
    base_acc, _ = evaluate.probe_accuracy(model, tok, probe)
    other_before, _ = _hits(model, tok, people[1])

    result = run_job(
        JobSpec(
            model_source=str(target),
            forget=synthetic.qa_items(people[0]),
            retain=[i for p in people[1:] for i in synthetic.qa_items(p)],
        ),
        tmp_path / "job",
    )
    unlearned = PeftModel.from_pretrained(model, result.adapter_dir)  # wraps `model` in place
    left, answers = _hits(unlearned, tok, people[0])
    assert left <= 2, answers
    acc, _ = evaluate.probe_accuracy(unlearned, tok, probe)
    assert acc >= 0.9 * base_acc, (acc, base_acc)
    other, answers = _hits(unlearned, tok, people[1])
    assert other >= 0.7 * other_before, answers  # another person's facts stay
