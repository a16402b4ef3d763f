"""The state tables and their enforcement on the ORM models."""

from __future__ import annotations

import itertools

import pytest

from service.states import (
    JOB_TRANSITIONS,
    REQUEST_STATUS_FOR_STAGE,
    REQUEST_TRANSITIONS,
    IllegalTransition,
    JobStage,
    RequestStatus,
    check_job,
    check_request,
)

R, J = RequestStatus, JobStage


@pytest.mark.parametrize("current,target", list(itertools.product(R, R)))
def test_request_transitions_follow_the_table(current, target):
    legal = target == current or target in REQUEST_TRANSITIONS[current]
    if legal:
        assert check_request(current.value, target.value) is target
    else:
        with pytest.raises(IllegalTransition):
            check_request(current.value, target.value)


@pytest.mark.parametrize("current,target", list(itertools.product(J, J)))
def test_job_transitions_follow_the_table(current, target):
    legal = target == current or target in JOB_TRANSITIONS[current]
    if legal:
        assert check_job(current.value, target.value) is target
    else:
        with pytest.raises(IllegalTransition):
            check_job(current.value, target.value)


def test_the_happy_path_is_legal_and_terminal_states_are_final():
    path = [R.RECEIVED, R.QUEUED, R.RUNNING, R.EVALUATING, R.COMPLETED]
    for a, b in itertools.pairwise(path):
        assert b in REQUEST_TRANSITIONS[a]
    for terminal in (R.COMPLETED, R.FAILED, R.CANCELED, R.REJECTED):
        assert REQUEST_TRANSITIONS[terminal] == frozenset()
    with pytest.raises(IllegalTransition):
        check_request("completed", "running")


def test_new_rows_start_in_their_first_state():
    assert check_request(None, "received") is R.RECEIVED
    with pytest.raises(IllegalTransition):
        check_request(None, "completed")
    with pytest.raises(IllegalTransition):
        check_job(None, "training")


def test_every_job_move_has_a_legal_request_counterpart():
    """A job's stage change must never force its requests through an illegal move."""
    for stage, nexts in JOB_TRANSITIONS.items():
        for nxt in nexts:
            a, b = REQUEST_STATUS_FOR_STAGE[stage], REQUEST_STATUS_FOR_STAGE[nxt]
            assert a == b or b in REQUEST_TRANSITIONS[a], (stage, nxt)


def test_orm_model_refuses_an_illegal_assignment():
    from service.erasure_requests.models import ErasureRequest
    from service.jobs.models import Job

    req = ErasureRequest(status="received")
    req.status = "queued"
    with pytest.raises(IllegalTransition):
        req.status = "completed"
    assert req.status == "queued"
    with pytest.raises(IllegalTransition):
        ErasureRequest(status="running")
    job = Job(stage="queued")
    with pytest.raises(IllegalTransition):
        job.stage = "succeeded"
