"""The audit retry's settings: stronger after a round that forgot too little, gentler
after one that overshot (the erasure itself detectable), and round 0 again with the
forget tokens' NLL capped after one whose forgotten items ended surer of some other
value than never-seen ones."""

from __future__ import annotations

import pytest

from workers.ml.specs import DEFAULT_METHOD, SimNPO
from workers.pipeline import (
    CALIBRATION_SCORE,
    RETRY_TOKEN_NLL_CAP,
    JobInput,
    method_for_round,
    overshot,
    round_settings,
    too_sure,
)


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


def test_too_sure_is_min_k_pp_alone_failed_on_the_low_side():
    assert too_sure(_audit((CALIBRATION_SCORE, "privacy", 0.17)))
    assert overshot(_audit((CALIBRATION_SCORE, "privacy", 0.17)))  # still low-side
    assert not too_sure(_audit((CALIBRATION_SCORE, "privacy", 0.9)))  # unsure: high side
    assert not too_sure(
        _audit((CALIBRATION_SCORE, "privacy", 0.17), ("mia_loss_auc", "privacy", 0.1))
    )
    assert not too_sure(
        _audit((CALIBRATION_SCORE, "privacy", 0.17), ("forget_value_leak", "forgetting", 0.3))
    )
    assert not too_sure(_audit()) and not too_sure({})


def test_after_too_sure_the_retry_is_round_zero_with_the_token_nll_capped():
    uncapped = {**DEFAULT_METHOD, "token_nll_cap": None}
    again = method_for_round(dict(uncapped), 1, overshot=True, too_sure=True)
    assert again == {**uncapped, "token_nll_cap": RETRY_TOKEN_NLL_CAP}
    SimNPO.model_validate(again)  # a spec the engine takes
    tighter = method_for_round(dict(uncapped), 2, overshot=True, too_sure=True)
    assert tighter["token_nll_cap"] == RETRY_TOKEN_NLL_CAP / 2
    # the default has its own cap: the retry halves it
    default = method_for_round(dict(DEFAULT_METHOD), 1, too_sure=True)
    assert default == {**DEFAULT_METHOD, "token_nll_cap": DEFAULT_METHOD["token_nll_cap"] / 2}
    # a cap round 0 already had is halved each round: the same settings would give
    # round 0's adapter again, to the last bit
    for asked, rnd, cap in ((3.0, 1, 1.5), (8.0, 1, 4.0), (8.0, 2, 2.0), (20.0, 1, 8.0)):
        again = method_for_round({**DEFAULT_METHOD, "token_nll_cap": asked}, rnd, too_sure=True)
        assert again["token_nll_cap"] == cap, (asked, rnd)
    # another method has no such cap: the overshoot's retry as before
    npo = {"name": "npo", "lr": 1e-3, "max_steps": 48}
    assert method_for_round(npo, 1, overshot=True, too_sure=True) == method_for_round(
        npo, 1, overshot=True
    )
    assert method_for_round(npo, 1, overshot=True)["lr"] == 5e-4


def _input(audit_rounds: int, round_method: dict | None) -> JobInput:
    return JobInput(
        model_source="m",
        request_ids=["r"],
        forget=[],
        forget_owner=[],
        holdout=[],
        holdout_sizes=[],
        retain=[],
        method=dict(DEFAULT_METHOD),
        parent_version=None,
        parent_prefix=None,
        audit_rounds=audit_rounds,
        round_method=round_method,
        policy={},
        regression=[],
        regression_owner=[],
    )


def test_a_job_resumed_in_a_retry_trains_on_with_the_settings_that_retry_started_with():
    failed = _audit((CALIBRATION_SCORE, "privacy", 0.17))
    capped = method_for_round(dict(DEFAULT_METHOD), 1, overshot=True, too_sure=True)
    # the worker that ran round 0 chooses the retry from its audit
    assert round_settings(_input(0, None), 1, failed) == capped
    # a worker that resumes the retry has no audit: the stored settings decide
    assert round_settings(_input(1, capped), 1, {}) == capped
    # without them (a job from before the column) the plain retry, as before
    assert round_settings(_input(1, None), 1, {}) == method_for_round(dict(DEFAULT_METHOD), 1)
    # round 0 is always as asked, and a later round is chosen from its own audit
    assert round_settings(_input(0, None), 0, {}) == DEFAULT_METHOD
    cap = DEFAULT_METHOD["token_nll_cap"]
    assert round_settings(_input(1, capped), 2, failed)["token_nll_cap"] == cap / 4  # type: ignore[operator]
