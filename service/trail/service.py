"""The tamper-evident trail: append an event, verify the chain.

hash_n = SHA-256(canonical JSON of {seq, occurred_at, actor, tenant_id, event_type,
object_type, object_id, payload_digest, prev_hash}); payload_digest = SHA-256 of the
canonical JSON of `details`; the first event's prev_hash is 64 zeros. Appends are
serialised (PostgreSQL: a transaction-scoped advisory lock; SQLite: BEGIN IMMEDIATE),
so sequence numbers have no gaps and the chain never forks.

The intake does not take that lock: holding it from the append to the commit serialised
every submission (measured: 170 req/s with it, 320 without, on 2 cores). It records its
event as pending (`deferred=True`), in its own transaction, and the next locked append
chains every committed pending event first, oldest first; so does `seal_pending`, which
the dispatcher calls every tick and the trail's readers call before they read. An event
is chained within a dispatcher tick of its commit and always before any later event of
the same object (which is appended after it commits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from service.crypto import canonical_json, sha256_hex
from service.db import insert_row, is_postgres, new_id, utcnow
from service.trail.models import AuditEvent, PendingEvent

GENESIS = "0" * 64
_LOCK_KEY = 0x756E6C6561726E  # "unlearn": the advisory lock id for trail appends


def link_hash(event: AuditEvent) -> str:
    """The hash that chains `event` to its predecessor (see the module docstring)."""
    return sha256_hex(
        canonical_json(
            {
                "seq": event.seq,
                "occurred_at": event.occurred_at.isoformat(timespec="microseconds"),
                "actor": event.actor,
                "tenant_id": event.tenant_id,
                "event_type": event.event_type,
                "object_type": event.object_type,
                "object_id": event.object_id,
                "payload_digest": event.payload_digest,
                "prev_hash": event.prev_hash,
            }
        )
    )


def record(
    session: Session,
    *,
    actor: str,
    event_type: str,
    object_type: str,
    object_id: str,
    details: dict[str, Any],
    tenant_id: str | None = None,
    deferred: bool = False,
) -> AuditEvent | PendingEvent:
    """Append one event in the caller's transaction; it commits or rolls back with it.
    `deferred`: record it as pending, chained after the commit (see the module docs)."""
    # Microsecond precision: what every backend stores, so the hash can be recomputed.
    fields: dict[str, Any] = {
        "occurred_at": utcnow(),
        "actor": actor,
        "tenant_id": tenant_id,
        "event_type": event_type,
        "object_type": object_type,
        "object_id": object_id,
        "details": details,
    }
    if deferred:
        pending = PendingEvent(id=new_id(), **fields)
        insert_row(session, pending)
        return pending
    seq, prev, _ = _lock_and_seal(session)
    event = _link(seq, prev, fields)
    session.add(event)
    session.flush()
    return event


# What an event says (the rest, seq and the hashes, is its place in the chain).
_FIELDS = (
    "occurred_at",
    "actor",
    "tenant_id",
    "event_type",
    "object_type",
    "object_id",
    "details",
)


def _link(seq: int, prev: str, fields: dict[str, Any]) -> AuditEvent:
    event = AuditEvent(
        seq=seq, payload_digest=sha256_hex(canonical_json(fields["details"])), prev_hash=prev
    )
    for key, value in fields.items():
        setattr(event, key, value)
    event.hash = link_hash(event)
    return event


def _lock_and_seal(session: Session) -> tuple[int, str, int]:
    """Take the chain's lock and chain every committed pending event, oldest first: the
    next sequence number, the hash it links to, and how many were chained."""
    if is_postgres(session):
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
    last = session.execute(
        select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
    ).first()
    seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
    pending = session.scalars(
        select(PendingEvent).order_by(PendingEvent.occurred_at, PendingEvent.id)
    ).all()
    for row in pending:
        event = _link(seq, prev, {key: getattr(row, key) for key in _FIELDS})
        session.add(event)
        session.delete(row)
        seq, prev = seq + 1, event.hash
    if pending:
        session.flush()
    return seq, prev, len(pending)


def seal_pending(session: Session) -> int:
    """Chain the committed pending events in the caller's transaction; how many. Takes
    the lock only when there is something to chain."""
    if session.scalar(select(PendingEvent.id).limit(1)) is None:
        return 0
    return _lock_and_seal(session)[2]


@dataclass
class VerifyResult:
    ok: bool
    events_checked: int
    last_seq: int | None
    first_broken_seq: int | None = None
    problem: str | None = None


def verify(session: Session, *, batch: int = 5000) -> VerifyResult:
    """Recompute every digest and link, oldest first; report the first broken one."""
    prev, expected_seq, checked, after = GENESIS, 1, 0, 0
    while True:
        rows = session.scalars(
            select(AuditEvent).where(AuditEvent.seq > after).order_by(AuditEvent.seq).limit(batch)
        ).all()
        if not rows:
            break
        for ev in rows:
            problem = None
            if ev.seq != expected_seq:
                problem = f"sequence gap: expected {expected_seq}, found {ev.seq}"
            elif ev.prev_hash != prev:
                problem = "prev_hash does not match the previous event's hash"
            elif ev.payload_digest != sha256_hex(canonical_json(ev.details)):
                problem = "details do not match payload_digest"
            elif ev.hash != link_hash(ev):
                problem = "hash does not match the event's fields"
            if problem:
                return VerifyResult(
                    False, checked, ev.seq - 1 if checked else None, ev.seq, problem
                )
            prev, expected_seq, checked = ev.hash, ev.seq + 1, checked + 1
        after = rows[-1].seq
    return VerifyResult(True, checked, expected_seq - 1 if checked else None)
