"""The audit retry's settings: stronger after a round that forgot too little, gentler
after one that overshot (the erasure itself detectable)."""

from __future__ import annotations

import pytest

from workers.ml.specs import DEFAULT_METHOD
from workers.pipeline import method_for_round, overshot


def _audit(*failed: tuple[str, str, float]) -> dict:
    return {"verdict": {"failed": [{"name": n, "group": g, "value": v} for n, g, v in failed]}}


def test_round_zero_runs_as_asked():
    assert method_for_round(dict(DEFAULT_METHOD), 0) == DEFAULT_METHOD


def test_a_retry_runs_longer_on_more_retain_items_at_the_same_learning_rate():
    retry = method_for_round({**DEFAULT_METHOD, "retain_eval_items": 24}, 1)
    assert retry["max_steps"] == 2 * DEFAULT_METHOD["max_steps"]  # type: ignore[operator]
    assert retry["retain_eval_items"] == 32 and retry["lr"] == DEFAULT_METHOD["lr"]


def test_after_an_overshoot_the_retry_also_halves_the_learning_rate():
    gentle = method_for_round(dict(DEFAULT_METHOD), 1, overshot=True)
    assert gentle["lr"] == DEFAULT_METHOD["lr"] / 2  # type: ignore[operator]
    assert gentle["max_steps"] == 2 * DEFAULT_METHOD["max_steps"]  # type: ignore[operator]


def test_overshoot_is_a_membership_test_failed_on_the_low_side():
    assert overshot(_audit(("mia_loss_auc", "privacy", 0.02)))
    assert not overshot(_audit(("mia_loss_auc", "privacy", 0.93)))  # still remembered
    assert not overshot(_audit(("forget_prob_ratio", "forgetting", 0.6)))
    assert not overshot(_audit())


def test_a_retry_lets_the_answer_guard_allow_what_the_audit_allows():
    from workers.audit.policy import AuditPolicy
    from workers.ml.specs import SimNPO
    from workers.pipeline import RETRY_ANSWERS_TOLERANCE

    assert SimNPO.model_validate(DEFAULT_METHOD).retain_answers_tolerance == 0.0  # round 0
    retry = method_for_round(dict(DEFAULT_METHOD), 1)
    assert retry["retain_answers_tolerance"] == RETRY_ANSWERS_TOLERANCE
    assert 1 - AuditPolicy().min_retain_answers_kept == pytest.approx(RETRY_ANSWERS_TOLERANCE)
    # a looser guard stays as asked, and a guard switched off stays off
    loose = method_for_round({**DEFAULT_METHOD, "retain_answers_tolerance": 0.3}, 1)
    assert loose["retain_answers_tolerance"] == 0.3
    off = method_for_round({**DEFAULT_METHOD, "retain_answers_tolerance": None}, 1)
    assert off["retain_answers_tolerance"] is None
