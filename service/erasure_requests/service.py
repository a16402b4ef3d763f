"""Erasure requests: intake, reading, cancelling, status changes, purging.

Functions take keyword-only arguments and never commit; the caller owns the
transaction, so a request row, its ciphertexts and its trail event land together or
not at all.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from dateutil.relativedelta import relativedelta
from sqlalchemy import and_, bindparam, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.access.service import Principal
from service.config import get_settings
from service.crypto import canonical_json, get_cipher, salted_item_hashes, sha256_hex
from service.db import claim_rows, insert_row, is_postgres, is_uuid, new_id, utcnow
from service.erasure_requests.models import ErasureRequest
from service.erasure_requests.schemas import ErasureRequestCreate
from service.errors import Problem, not_found
from service.limits import check_count, check_item_bytes
from service.models_registry import service as registry
from service.models_registry.models import RegisteredModel
from service.states import REQUEST_CANCELABLE, RequestStatus
from service.trail import service as trail

R = RequestStatus
# Raw data has no further purpose once a request is withdrawn or refused.
_PURGE_AT_ONCE = frozenset({R.CANCELED, R.REJECTED})


@dataclass
class Submission:
    # A new request is written with a Core INSERT and answered from this object, which
    # stays outside the session; `session.get` gives the live row.
    request: ErasureRequest
    created: bool


_requests, _models = ErasureRequest.__table__.c, RegisteredModel.__table__.c
_FILED_UNDER_KEY = (
    select(_requests.id)
    .where(_requests.tenant_id == bindparam("t"), _requests.idempotency_key == bindparam("k"))
    .scalar_subquery()
)
_MODEL_ID = select(_models.id).where(_models.name == bindparam("m")).scalar_subquery()
_KEY_AND_MODEL = select(_FILED_UNDER_KEY, _MODEL_ID)
_KEY_AND_MODEL_LOCKED = select(
    _FILED_UNDER_KEY,
    _MODEL_ID,
    func.pg_try_advisory_xact_lock(func.hashtext(bindparam("t")), func.hashtext(bindparam("k"))),
)


def _key_and_model(
    session: Session, tenant_id: str, key: str, model_name: str
) -> tuple[str | None, str | None]:
    """One round trip: the request already filed under this Idempotency-Key, if any, and
    the model's id. On PostgreSQL it also takes the key's advisory lock, so a second
    writer with the same key while the first transaction is open gets 409 instead of
    waiting (SQLite serialises writers with BEGIN IMMEDIATE). A writer that commits the
    key between this statement's snapshot and its lock is caught by the unique index."""
    locking = is_postgres(session)
    params = {"t": tenant_id, "k": key, "m": model_name}
    row = session.execute(_KEY_AND_MODEL_LOCKED if locking else _KEY_AND_MODEL, params).one()
    if locking and not row[2]:
        raise Problem(
            409,
            "idempotency-in-progress",
            "Request in progress",
            "a request with this Idempotency-Key is still being written; retry shortly",
            headers={"Retry-After": "1"},
        )
    return row[0], row[1]


def _find_by_key(session: Session, tenant_id: str, key: str) -> ErasureRequest | None:
    return session.scalar(
        select(ErasureRequest).where(
            ErasureRequest.tenant_id == tenant_id, ErasureRequest.idempotency_key == key
        )
    )


def _replay(existing: ErasureRequest, body_hmac: str) -> Submission:
    if existing.body_hmac != body_hmac:
        raise Problem(
            422,
            "idempotency-key-reused",
            "Idempotency-Key reused",
            "this Idempotency-Key was already used with a different body; use a new key "
            "for a new request",
            existing_request=existing.id,
        )
    return Submission(existing, created=False)


def submit(
    session: Session, *, principal: Principal, body: ErasureRequestCreate, idempotency_key: str
) -> Submission:
    settings = get_settings()
    check_count("items", len(body.items), settings.max_items_per_request, "MAX_ITEMS_PER_REQUEST")
    check_count("holdout", len(body.holdout), settings.max_holdout_items, "MAX_HOLDOUT_ITEMS")
    check_item_bytes("items", body.items, settings.max_item_bytes)
    check_item_bytes("holdout", body.holdout, settings.max_item_bytes)

    cipher = get_cipher()
    body_hmac = cipher.keyed_hash(canonical_json(body.model_dump(mode="json")).decode())
    model_name = body.model if registry.is_model_name(body.model) else ""
    existing_id, model_id = _key_and_model(
        session, principal.tenant_id, idempotency_key, model_name
    )
    if existing_id is not None:
        return _replay(session.get_one(ErasureRequest, existing_id), body_hmac)
    if model_id is None:
        raise not_found("model", body.model)
    request_id, now = new_id(), utcnow()
    items = [i.plain() for i in body.items]
    holdout = [i.plain() for i in body.holdout]
    salt = os.urandom(16)
    method = body.method.model_dump() if body.method else None
    kinds = {i.kind for i in body.items}
    req = ErasureRequest(
        id=request_id,
        tenant_id=principal.tenant_id,
        model_id=model_id,
        status=R.RECEIVED.value,
        idempotency_key=idempotency_key,
        body_hmac=body_hmac,
        subject_ref_hmac=cipher.keyed_hash(body.subject_ref),
        subject_ref_ciphertext=cipher.encrypt(
            body.subject_ref.encode(), bound_to=f"{request_id}/subject"
        ),
        items_ciphertext=cipher.encrypt_json(items, bound_to=f"{request_id}/items"),
        holdout_ciphertext=cipher.encrypt_json(holdout, bound_to=f"{request_id}/holdout"),
        item_kind=kinds.pop() if len(kinds) == 1 else "mixed",
        item_count=len(items),
        holdout_count=len(holdout),
        item_salt=salt.hex(),
        item_hashes=salted_item_hashes(items, salt),
        holdout_hashes=salted_item_hashes(holdout, salt),
        method_override=method,
        method_key=sha256_hex(canonical_json(method)) if method else "default",
        received_at=now,
        due_at=now + relativedelta(months=1),  # GDPR Art. 12(3): one month
    )
    try:
        insert_row(session, req)
    except IntegrityError:  # same key committed between our check and insert
        session.rollback()
        existing = _find_by_key(session, principal.tenant_id, idempotency_key)
        if existing is None:
            raise
        return _replay(existing, body_hmac)
    trail.record(
        session,
        actor=principal.key_id,
        tenant_id=principal.tenant_id,
        event_type="erasure_request.received",
        deferred=True,  # chained after the commit: intake never waits for the chain's lock
        object_type="erasure_request",
        object_id=request_id,
        details={
            "model": body.model,
            "subject": req.subject_ref_hmac,
            "items": req.item_count,
            "holdout": req.holdout_count,
            "to": R.RECEIVED.value,
        },
    )
    return Submission(req, created=True)


def get_for(session: Session, *, principal: Principal, request_id: str) -> ErasureRequest:
    req = session.get(ErasureRequest, request_id) if is_uuid(request_id) else None
    # Another tenant's request is indistinguishable from a missing one.
    if req is None or (req.tenant_id != principal.tenant_id and not principal.is_admin):
        raise not_found("erasure request", request_id)
    return req


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        at, rid = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        if not is_uuid(rid):
            raise ValueError("cursor id")
        return datetime.fromisoformat(at), rid
    except (ValueError, TypeError) as exc:
        raise Problem(
            400,
            "invalid-cursor",
            "Invalid cursor",
            "cursor is not one this API returned; start again without it",
        ) from exc


def encode_cursor(req: ErasureRequest) -> str:
    raw = json.dumps([req.received_at.isoformat(), req.id]).encode()
    return base64.urlsafe_b64encode(raw).decode()


def list_for(
    session: Session,
    *,
    principal: Principal,
    status: RequestStatus | None,
    model: str | None,
    cursor: str | None,
    limit: int,
) -> tuple[list[ErasureRequest], str | None]:
    """Newest first, keyset-paginated on (received_at, id): stable under inserts."""
    q = select(ErasureRequest)
    if not principal.is_admin:
        q = q.where(ErasureRequest.tenant_id == principal.tenant_id)
    if status is not None:
        q = q.where(ErasureRequest.status == status.value)
    if model is not None:
        q = q.where(ErasureRequest.model_id == registry.get_by_name(session, model).id)
    if cursor:
        at, rid = decode_cursor(cursor)
        q = q.where(
            or_(
                ErasureRequest.received_at < at,
                and_(ErasureRequest.received_at == at, ErasureRequest.id < rid),
            )
        )
    rows = list(
        session.scalars(
            q.order_by(ErasureRequest.received_at.desc(), ErasureRequest.id.desc()).limit(limit + 1)
        )
    )
    page, more = rows[:limit], len(rows) > limit
    return page, encode_cursor(page[-1]) if more and page else None


def set_status(
    session: Session,
    req: ErasureRequest,
    to: RequestStatus,
    *,
    actor: str,
    reason: str | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """The only way code changes a request's status: the model guard refuses illegal
    moves, timestamps follow, and the change is an event in the trail."""
    before = req.status
    if before == to.value:
        return
    req.status = to.value
    now = utcnow()
    if to is R.QUEUED and req.queued_at is None:
        req.queued_at = now
    if to is R.RUNNING and req.started_at is None:
        req.started_at = now
    if to in (R.COMPLETED, R.FAILED, R.CANCELED, R.REJECTED):
        req.finished_at = now
    if reason is not None:
        req.status_reason = reason[:1000]
    trail.record(
        session,
        actor=actor,
        tenant_id=req.tenant_id,
        event_type=f"erasure_request.{to.value}",
        object_type="erasure_request",
        object_id=req.id,
        details={"from": before, "to": to.value, **(extra or {})},
    )
    if to in _PURGE_AT_ONCE:
        purge_data(session, req, actor=actor, why=f"request {to.value}")


def cancel(session: Session, *, principal: Principal, request_id: str) -> ErasureRequest:
    """The client withdraws its request (until its adapter is being published)."""
    return _withdraw(session, principal, request_id, R.CANCELED, "canceled by client")


def reject(
    session: Session, *, principal: Principal, request_id: str, reason: str
) -> ErasureRequest:
    """An admin refuses a request (identity not verified, an Art. 17(3) exemption...)."""
    return _withdraw(session, principal, request_id, R.REJECTED, reason)


def _withdraw(
    session: Session, principal: Principal, request_id: str, to: RequestStatus, reason: str
) -> ErasureRequest:
    from service.jobs import service as jobs  # jobs imports this module

    req = get_for(session, principal=principal, request_id=request_id)
    # Lock order job -> request, the same as a worker publishing the job's adapter.
    job = jobs.lock(session, req.job_id) if req.job_id else None
    if is_postgres(session):
        session.refresh(req, with_for_update=True)  # a dispatcher may be claiming it
        if req.job_id and (job is None or job.id != req.job_id):
            raise Problem(
                409,
                "busy",
                "Request is being scheduled",
                "retry in a second",
                headers={"Retry-After": "1"},
            )
    verb, slug = (
        ("canceled", "not-cancelable") if to is R.CANCELED else ("rejected", "not-rejectable")
    )
    if RequestStatus(req.status) not in REQUEST_CANCELABLE:
        raise Problem(
            409,
            slug,
            f"Request can no longer be {verb}",
            f"the request is {req.status}; only requests not yet fulfilled can be {verb}",
            status_now=req.status,
        )
    if job is not None and job.stage == "packaging":
        raise Problem(
            409,
            slug,
            f"Request can no longer be {verb}",
            "its adapter is being published right now; once completed, submit a new request "
            "if the data must be handled differently",
            status_now=req.status,
        )
    set_status(session, req, to, actor=principal.key_id, reason=reason)
    if job is not None:
        jobs.request_withdrawn(session, job, actor=principal.key_id)
    return req


def purge_data(session: Session, req: ErasureRequest, *, actor: str, why: str) -> None:
    if req.data_purged_at is not None:
        return
    req.items_ciphertext = None
    req.holdout_ciphertext = None
    req.data_purged_at = utcnow()
    trail.record(
        session,
        actor=actor,
        tenant_id=req.tenant_id,
        event_type="erasure_request.data_purged",
        object_type="erasure_request",
        object_id=req.id,
        details={"why": why},
    )


def purge_due(session: Session, *, now: datetime | None = None, actor: str = "purger") -> int:
    """Purge raw items of completed and failed requests older than the retention period."""
    cutoff = (now or utcnow()) - timedelta(days=get_settings().retention_days)
    q = (
        select(ErasureRequest)
        .where(
            ErasureRequest.status.in_([R.COMPLETED.value, R.FAILED.value]),
            ErasureRequest.data_purged_at.is_(None),
            ErasureRequest.finished_at <= cutoff,
        )
        .limit(500)
    )
    rows = list(session.scalars(claim_rows(q, session)))
    for req in rows:
        purge_data(session, req, actor=actor, why="retention period elapsed")
    return len(rows)


def decrypt_items(req: ErasureRequest) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Forget and holdout items in the clear, for the worker only; empty after purge."""
    if req.items_ciphertext is None:
        return [], []
    cipher = get_cipher()
    items = cipher.decrypt_json(req.items_ciphertext, bound_to=f"{req.id}/items")
    holdout = (
        cipher.decrypt_json(req.holdout_ciphertext, bound_to=f"{req.id}/holdout")
        if req.holdout_ciphertext is not None
        else []
    )
    return items, holdout


def subject_ref(req: ErasureRequest) -> str:
    return get_cipher().decrypt(req.subject_ref_ciphertext, bound_to=f"{req.id}/subject").decode()
