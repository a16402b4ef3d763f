"""The quality benchmark's measurements (TOFU's truth ratio, forget quality, utility) on
the tiny target: what they return can be wrong in ways a table would not show."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import quality_metrics as qm
from tests.ml.targets import PEOPLE
from workers.ml import synthetic


def test_truth_items_are_paraphrases_with_fabricated_values() -> None:
    person = PEOPLE[0]
    items = qm.truth_items(person, (0, 1))
    assert len(items) == 20
    assert items == qm.truth_items(person, (0, 1))  # seeded by the question
    secrets = person.secrets()
    for k, it in enumerate(items):
        assert it["prompt"] == synthetic.qa_items(person)[k]["prompt"]
        assert secrets[k // 2] in it["paraphrased"]
        assert it["paraphrased"] != synthetic.qa_items(person)[k]["completion"]
        assert len(it["perturbed"]) == qm.PERTURBATIONS
        # fabricated values, all different: the name stays, the secret goes
        assert not any(secrets[k // 2] in p for p in it["perturbed"])
        assert len(set(it["perturbed"])) == qm.PERTURBATIONS
        assert all(person.first in p for p in it["perturbed"])


def test_forget_quality_is_a_ks_p_value() -> None:
    same = [0.1 * k for k in range(20)]
    assert qm.forget_quality(same, same) == pytest.approx(1.0)
    assert qm.forget_quality(same, [x + 10 for x in same]) < 1e-6


def test_measure_on_the_tiny_target(tiny_target: str) -> None:
    row = qm.measure(Path(tiny_target), None, PEOPLE[:1], PEOPLE[2:4])
    assert len(row["truth_forget"]) == 20
    assert all(r > 0 for r in row["truth_forget"])
    assert 0 <= row["utility"] <= 1
    assert set(row["utility_parts"]) == {"retain_prob", "retain_rouge", "retain_truth", "probe"}
    assert 0 <= row["mia_auc"] <= 1
    assert row["forget_items"] == 20
    # the target was fine-tuned on 8 of the person's 20 items: they are likelier than
    # never-seen stand-ins, so the membership AUC leans to "member"
    assert row["mia_auc"] > 0.5
    assert row["secrets_per_person"] == [row["secrets_revealed"]]


def test_each_persons_items_are_one_run_of_the_forget_list() -> None:
    runs = qm._runs(PEOPLE[:3])
    assert runs == [(0, 20), (20, 20), (40, 20)]
    forget = [i for p in PEOPLE[:3] for i in synthetic.qa_items(p)]
    for person, (start, n) in zip(PEOPLE[:3], runs, strict=True):
        assert forget[start : start + n] == synthetic.qa_items(person)
