"""Batching, the worker-side job lifecycle, the reaper and the purge (PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from service import dispatcher
from service.db import utcnow
from service.erasure_requests import service as requests_svc
from service.jobs import service as jobs
from service.jobs.models import Job
from service.states import IllegalTransition, JobStage
from tests.service import factories as f

J = JobStage


@pytest.fixture
def who(db):
    return f.principal(db)


@pytest.fixture
def support(db):
    return f.model(db)


def test_window_and_size_decide_when_a_batch_becomes_a_job(db, who, support, settings):
    settings.batch_window_seconds = 60
    settings.batch_max_requests = 4
    reqs = f.requests(db, who, 6, support)
    created = dispatcher.batch_pending(db)
    assert len(created) == 1  # one full batch of 4; 2 wait for the window
    assert sorted(r.status for r in reqs) == ["queued"] * 4 + ["received"] * 2
    later = utcnow() + timedelta(seconds=61)
    assert len(dispatcher.batch_pending(db, now=later)) == 1
    assert {r.status for r in reqs} == {"queued"}
    assert len({r.job_id for r in reqs}) == 2


def test_requests_with_different_methods_never_share_a_job(db, who, support):
    plain = f.requests(db, who, 2, support)
    npo = f.requests(db, who, 2, support, method={"name": "npo", "beta": 0.2})
    dispatcher.batch_pending(db)
    assert len({r.job_id for r in plain}) == 1
    assert len({r.job_id for r in npo}) == 1
    assert plain[0].job_id != npo[0].job_id
    assert db.get(Job, npo[0].job_id).method["beta"] == 0.2


def test_full_lifecycle_moves_requests_with_the_job(db, who, support):
    reqs = f.requests(db, who, 2, support)
    [job_id] = dispatcher.batch_pending(db)
    job = jobs.claim(db, job_id=job_id, worker_id="w1")
    assert job is not None and job.attempts == 1
    assert jobs.claim(db, job_id=job_id, worker_id="w2") is None  # redelivered task
    assert {r.status for r in reqs} == {"running"}
    for stage in (J.TRAINING, J.EVALUATING, J.PACKAGING):
        jobs.advance(db, job, stage, actor="w1")
    assert {r.status for r in reqs} == {"evaluating"}
    jobs.advance(db, job, J.SUCCEEDED, actor="w1", adapter_version=1)
    assert {(r.status, r.adapter_version) for r in reqs} == {("completed", 1)}
    assert all(r.finished_at is not None for r in reqs)
    with pytest.raises(IllegalTransition):
        jobs.advance(db, job, J.TRAINING, actor="w1")


def test_heartbeat_records_progress_and_reports_the_stage(db, who, support):
    f.requests(db, who, 1, support)
    [job_id] = dispatcher.batch_pending(db)
    jobs.claim(db, job_id=job_id, worker_id="w1")
    assert jobs.heartbeat(db, job_id=job_id, worker_id="w1", progress=0.4) == jobs.Beat(
        J.PREPARING, ours=True
    )
    assert db.get(Job, job_id).progress == pytest.approx(0.4)
    # A worker that lost the job (reaped, re-claimed elsewhere) cannot move its progress,
    # and learns that the job is not its own.
    assert not jobs.heartbeat(db, job_id=job_id, worker_id="intruder", progress=0.9).ours
    assert db.get(Job, job_id).progress == pytest.approx(0.4)


def test_failed_job_fails_its_requests_with_the_reason(db, who, support):
    reqs = f.requests(db, who, 2, support)
    [job_id] = dispatcher.batch_pending(db)
    job = jobs.claim(db, job_id=job_id, worker_id="w1")
    jobs.advance(db, job, J.FAILED, actor="w1", reason="out of memory at batch size 1")
    assert {(r.status, r.status_reason) for r in reqs} == {
        ("failed", "out of memory at batch size 1")
    }


def test_canceling_every_request_of_a_queued_job_cancels_the_job(db, who, support):
    reqs = f.requests(db, who, 2, support)
    [job_id] = dispatcher.batch_pending(db)
    requests_svc.cancel(db, principal=who, request_id=reqs[0].id)
    assert db.get(Job, job_id).stage == "queued"
    requests_svc.cancel(db, principal=who, request_id=reqs[1].id)
    assert db.get(Job, job_id).stage == "canceled"
    assert jobs.claim(db, job_id=job_id, worker_id="w1") is None


def test_canceling_the_last_request_of_a_running_job_cancels_the_job(db, who, support):
    [req] = f.requests(db, who, 1, support)
    [job_id] = dispatcher.batch_pending(db)
    jobs.claim(db, job_id=job_id, worker_id="w1")
    jobs.advance(db, db.get(Job, job_id), JobStage.TRAINING, actor="w1")
    requests_svc.cancel(db, principal=who, request_id=req.id)
    assert req.status == "canceled"
    job = db.get(Job, job_id)
    assert job.stage == "canceled"
    # The worker learns it at its next heartbeat and stops between two steps.
    assert not jobs.heartbeat(db, job_id=job_id, worker_id="w1").ours


def test_canceling_one_request_restarts_a_running_job_without_it(db, who, support):
    keep, drop = f.requests(db, who, 2, support)
    [job_id] = dispatcher.batch_pending(db)
    jobs.claim(db, job_id=job_id, worker_id="w1")
    jobs.advance(db, db.get(Job, job_id), JobStage.TRAINING, actor="w1")
    requests_svc.cancel(db, principal=who, request_id=drop.id)
    job = db.get(Job, job_id)
    assert (job.stage, job.worker_id, job.enqueued_at, job.attempts) == ("queued", None, None, 0)
    assert (keep.status, drop.status) == ("queued", "canceled")
    assert [r.id for r in jobs.live_requests(db, job_id)] == [keep.id]


def test_a_request_being_published_cannot_be_canceled(db, who, support):
    from service.errors import Problem

    [req] = f.requests(db, who, 1, support)
    [job_id] = dispatcher.batch_pending(db)
    job = jobs.claim(db, job_id=job_id, worker_id="w1")
    for stage in (JobStage.TRAINING, JobStage.EVALUATING, JobStage.PACKAGING):
        jobs.advance(db, job, stage, actor="w1")
    with pytest.raises(Problem) as exc:
        requests_svc.cancel(db, principal=who, request_id=req.id)
    assert exc.value.status == 409
    assert "being published" in exc.value.detail
    assert req.status == "evaluating"


def test_reaper_requeues_then_fails_after_max_attempts(db, who, support, settings):
    settings.job_max_attempts = 2
    settings.heartbeat_timeout_seconds = 60
    reqs = f.requests(db, who, 2, support)
    [job_id] = dispatcher.batch_pending(db)
    job = db.get(Job, job_id)
    job.enqueued_at = utcnow()

    jobs.claim(db, job_id=job_id, worker_id="w1")
    assert jobs.reap(db) == []  # fresh heartbeat: alive
    late = utcnow() + timedelta(seconds=120)
    [reaped] = jobs.reap(db, now=late)
    assert reaped.action == "requeued"
    assert job.stage == "queued" and job.enqueued_at is None and job.worker_id is None
    assert {r.status for r in reqs} == {"queued"}

    jobs.claim(db, job_id=job_id, worker_id="w2")
    assert job.attempts == 2
    [reaped] = jobs.reap(db, now=late + timedelta(seconds=120))
    assert reaped.action == "failed"
    assert job.stage == "failed" and "gave up after 2 attempts" in job.error
    assert {r.status for r in reqs} == {"failed"}
    assert all("w2" in (r.status_reason or "") for r in reqs)


def test_purge_removes_raw_items_after_retention(db, who, support, settings):
    settings.retention_days = 30
    reqs = f.requests(db, who, 1, support)
    [job_id] = dispatcher.batch_pending(db)
    job = jobs.claim(db, job_id=job_id, worker_id="w1")
    for stage in (J.TRAINING, J.EVALUATING, J.PACKAGING):
        jobs.advance(db, job, stage, actor="w1")
    jobs.advance(db, job, J.SUCCEEDED, actor="w1", adapter_version=3)
    req = reqs[0]
    assert requests_svc.decrypt_items(req)[0][0]["completion"] == "Person 0 secret"

    assert requests_svc.purge_due(db) == 0  # retention not over yet
    assert requests_svc.purge_due(db, now=utcnow() + timedelta(days=31)) == 1
    assert req.items_ciphertext is None and req.holdout_ciphertext is None
    assert req.data_purged_at is not None
    assert requests_svc.decrypt_items(req) == ([], [])
    assert requests_svc.purge_due(db, now=utcnow() + timedelta(days=32)) == 0  # once only

    from service.trail.models import AuditEvent

    events = db.query(AuditEvent).filter_by(object_id=req.id).all()
    assert [e.event_type for e in events][-1] == "erasure_request.data_purged"


def test_subject_ref_decrypts_only_for_its_own_row(db, who, support):
    from service.crypto import DecryptionError, get_cipher

    a, b = f.requests(db, who, 2, support)
    assert requests_svc.subject_ref(a) == "subject-0"
    with pytest.raises(DecryptionError):  # a ciphertext copied into another row
        get_cipher().decrypt(a.subject_ref_ciphertext, bound_to=f"{b.id}/subject")


def test_a_retry_s_settings_are_stored_with_its_round_for_a_resumed_job(live_db):
    """The pipeline writes the settings of the audit round it starts; the worker that
    resumes the job reads them back (PostgreSQL, real commits)."""
    from workers import pipeline

    with live_db() as s:
        f.requests(s, f.principal(s), 1, f.model(s))
        [job_id] = dispatcher.batch_pending(s)
        jobs.claim(s, job_id=job_id, worker_id="w1")
        s.commit()
    assert pipeline._read_input(job_id, "w1").round_method is None  # round 0: as asked
    retry = {"name": "simnpo", "token_nll_cap": 8.0}
    pipeline._set_audit_round(job_id, "w1", 1, retry)
    inp = pipeline._read_input(job_id, "w1")
    assert (inp.audit_rounds, inp.round_method) == (1, retry)
    with pytest.raises(jobs.NotOwned):  # only the owner moves the round on
        pipeline._set_audit_round(job_id, "w2", 2, retry)
