"""The one place that says which status changes are legal, for requests and for jobs.

Models guard their `status`/`stage` attributes with these tables (see `guard`), so an
illegal change raises `IllegalTransition` wherever it is attempted; the API turns that
into 409. Request status follows its job's stage (`REQUEST_STATUS_FOR_STAGE`).
"""

from __future__ import annotations

from enum import StrEnum


class RequestStatus(StrEnum):
    RECEIVED = "received"  # stored, waiting for the dispatcher
    QUEUED = "queued"  # in a job that no worker has started yet
    RUNNING = "running"  # its job is preparing or training
    EVALUATING = "evaluating"  # its job's adapter is being audited or packaged
    COMPLETED = "completed"  # fulfilled by a published, audited adapter version
    FAILED = "failed"
    CANCELED = "canceled"
    REJECTED = "rejected"


class JobStage(StrEnum):
    QUEUED = "queued"
    PREPARING = "preparing"
    TRAINING = "training"
    EVALUATING = "evaluating"
    PACKAGING = "packaging"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


R, J = RequestStatus, JobStage

REQUEST_TRANSITIONS: dict[RequestStatus, frozenset[RequestStatus]] = {
    R.RECEIVED: frozenset({R.QUEUED, R.CANCELED, R.REJECTED}),
    # queued -> received: its job was canceled or dissolved before any worker took it.
    R.QUEUED: frozenset({R.RUNNING, R.RECEIVED, R.CANCELED, R.FAILED, R.REJECTED}),
    # running -> queued: the worker died and the reaper re-queued the job.
    R.RUNNING: frozenset({R.EVALUATING, R.QUEUED, R.FAILED, R.CANCELED}),
    # evaluating -> running: the audit failed and the job retries with stronger settings.
    R.EVALUATING: frozenset({R.COMPLETED, R.RUNNING, R.QUEUED, R.FAILED, R.CANCELED}),
    R.COMPLETED: frozenset(),
    R.FAILED: frozenset(),
    R.CANCELED: frozenset(),
    R.REJECTED: frozenset(),
}

# A client may cancel a request until its adapter is being published. A running job then
# restarts without it (or stops, when it was the job's last request).
REQUEST_CANCELABLE = frozenset({R.RECEIVED, R.QUEUED, R.RUNNING, R.EVALUATING})
REQUEST_TERMINAL = frozenset(s for s, nxt in REQUEST_TRANSITIONS.items() if not nxt)

JOB_TRANSITIONS: dict[JobStage, frozenset[JobStage]] = {
    J.QUEUED: frozenset({J.PREPARING, J.FAILED, J.CANCELED}),
    J.PREPARING: frozenset({J.TRAINING, J.QUEUED, J.FAILED, J.CANCELED}),
    J.TRAINING: frozenset({J.EVALUATING, J.QUEUED, J.FAILED, J.CANCELED}),
    J.EVALUATING: frozenset({J.PACKAGING, J.TRAINING, J.QUEUED, J.FAILED, J.CANCELED}),
    J.PACKAGING: frozenset({J.SUCCEEDED, J.QUEUED, J.FAILED}),
    J.SUCCEEDED: frozenset(),
    J.FAILED: frozenset(),
    J.CANCELED: frozenset(),
}

JOB_TERMINAL = frozenset(s for s, nxt in JOB_TRANSITIONS.items() if not nxt)
JOB_ACTIVE = frozenset({J.PREPARING, J.TRAINING, J.EVALUATING, J.PACKAGING})

REQUEST_STATUS_FOR_STAGE: dict[JobStage, RequestStatus] = {
    J.QUEUED: R.QUEUED,
    J.PREPARING: R.RUNNING,
    J.TRAINING: R.RUNNING,
    J.EVALUATING: R.EVALUATING,
    J.PACKAGING: R.EVALUATING,
    J.SUCCEEDED: R.COMPLETED,
    J.FAILED: R.FAILED,
    J.CANCELED: R.CANCELED,
}


class IllegalTransition(Exception):
    """A status change the state tables forbid."""

    def __init__(self, kind: str, current: str | None, target: str) -> None:
        self.kind, self.current, self.target = kind, current, target
        super().__init__(f"a {kind} cannot go from {current!r} to {target!r}")


def check_request(current: str | None, target: str) -> RequestStatus:
    new = RequestStatus(target)
    if current is None:
        if new is not R.RECEIVED:
            raise IllegalTransition("request", None, new)
    elif new != current and new not in REQUEST_TRANSITIONS[RequestStatus(current)]:
        raise IllegalTransition("request", current, new)
    return new


def check_job(current: str | None, target: str) -> JobStage:
    new = JobStage(target)
    if current is None:
        if new is not J.QUEUED:
            raise IllegalTransition("job", None, new)
    elif new != current and new not in JOB_TRANSITIONS[JobStage(current)]:
        raise IllegalTransition("job", current, new)
    return new
