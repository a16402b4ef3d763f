"""The audit retry's settings: stronger after a round that forgot too little, gentler
after one that overshot (the erasure itself detectable)."""

from __future__ import annotations

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
