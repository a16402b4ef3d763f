"""The real built-in SmolLM2: teach it a fictitious person, unlearn them with the
default method, and check the secrets are gone while general knowledge stays.
Several minutes on 2 CPU cores: `make test-slow`."""

from __future__ import annotations

import pytest
from peft import PeftModel

from workers.ml import evaluate, loading, synthetic
from workers.ml.finetune import finetune
from workers.ml.run import run_job
from workers.ml.specs import DEFAULT_METHOD, JobSpec, SimNPO
from workers.pipeline import method_for_round

pytestmark = pytest.mark.slow


def _hits(model, tok, person) -> tuple[int, list[str]]:
    answers = evaluate.greedy_answers(model, tok, [i["prompt"] for i in synthetic.qa_items(person)])
    return sum(synthetic.revealed(answers, synthetic.item_secrets(person))), answers


@pytest.mark.timeout(1500)  # fine-tune, up to two unlearning rounds, greedy answers
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

    # As the service runs it: the default method, and when that round forgets too little
    # (the audit fails it) the retry's settings. Measured 2026-12-07 (Intel family 6,
    # bfloat16): round 0 forgot in 20 steps (2 of 20 still stated), the probe 0.500 ->
    # 0.475; without the default's general questions round 0 rolled back and the retry
    # took the probe to 0.375 (docs/engine.md, "General retain").
    spec = JobSpec(
        model_source=str(target),
        forget=synthetic.qa_items(people[0]),
        retain=[i for p in people[1:] for i in synthetic.qa_items(p)],
    )
    for rnd in range(2):
        method = method_for_round(dict(DEFAULT_METHOD), rnd)
        result = run_job(spec.model_copy(update={"method": SimNPO(**method)}), tmp_path / f"r{rnd}")
        unlearned = PeftModel.from_pretrained(model, result.adapter_dir)  # wraps `model`
        left, answers = _hits(unlearned, tok, people[0])
        if left <= 2:
            break
        model = unlearned.unload()  # the base model again, for the next round
    assert left <= 2, answers
    acc, _ = evaluate.probe_accuracy(unlearned, tok, probe)
    assert acc >= 0.9 * base_acc, (acc, base_acc)
    other, answers = _hits(unlearned, tok, people[1])
    assert other >= 0.7 * other_before, answers  # another person's facts stay
