"""The policy's verdict on crafted metrics: each criterion's bar, without a model."""

from __future__ import annotations

from workers.audit.policy import AuditPolicy
from workers.audit.run import _judge


def _prob_criterion(forget: tuple[float, float], holdout_before: float, **policy) -> dict:
    metrics = {
        "forget_prob": {"before": forget[0], "after": forget[1]},
        # the adapter raised the holdout items' probability: it must not lift the bar
        "holdout_prob": {"before": holdout_before, "after": 0.9},
    }
    got = _judge(metrics, AuditPolicy(**policy), has_holdout=True, mia=False)
    return next(c for c in got if c["name"] == "forget_prob_ratio")


def test_half_the_probability_passes_where_never_seen_data_is_far_less_likely():
    # the 8-person target: holdout level 0.28 of a forget probability of 0.94
    c = _prob_criterion((0.94, 0.40), holdout_before=0.28)
    assert c["passed"] and c["threshold"] == 0.5
    assert not _prob_criterion((0.94, 0.50), holdout_before=0.28)["passed"]


def test_the_holdout_level_passes_where_templates_carry_most_of_the_probability():
    # the 40-person quality target: stand-ins at 0.648 of a forget probability of 0.84;
    # the model retrained without the person reaches 0.636 (ratio 0.76)
    c = _prob_criterion((0.84, 0.636), holdout_before=0.648)
    assert c["passed"] and abs(c["threshold"] - 0.648 / 0.84) < 1e-9
    assert "never-seen holdout items: 0.648" in c["message"]
    assert not _prob_criterion((0.84, 0.66), holdout_before=0.648)["passed"]


def test_an_owner_can_ask_for_the_ratio_alone():
    c = _prob_criterion((0.84, 0.636), holdout_before=0.648, forget_prob_holdout_level=False)
    assert not c["passed"] and c["threshold"] == 0.5 and "never-seen" not in c["message"]


def test_without_holdout_items_the_ratio_alone_is_judged():
    metrics = {"forget_prob": {"before": 0.84, "after": 0.636}}
    got = _judge(metrics, AuditPolicy(), has_holdout=False, mia=False)
    assert [c["passed"] for c in got if c["name"] == "forget_prob_ratio"] == [False]


def _regression_criterion(regression: tuple[float, float], **policy) -> dict:
    metrics = {
        "forget_prob": {"before": 0.84, "after": 0.60},
        "holdout_prob": {"before": 0.696, "after": 0.63},
        "regression_prob": {"before": regression[0], "after": regression[1]},
    }
    got = _judge(metrics, AuditPolicy(**policy), has_holdout=True, mia=False)
    return next(c for c in got if c["name"] == "regression_prob_ratio")


def test_earlier_items_as_unlikely_as_never_seen_data_stay_forgotten():
    # version 2 of the service's chain on the 40-person target: person 0's items at 0.611,
    # stand-ins never seen at 0.696; half of the base (0.842) would ask for 0.421
    c = _regression_criterion((0.842, 0.611))
    assert c["passed"] and "never-seen holdout items: 0.696" in c["message"]
    assert not _regression_criterion((0.842, 0.72))["passed"]  # came back above it
    assert not _regression_criterion((0.842, 0.611), forget_prob_holdout_level=False)["passed"]
