"""The hash-chained trail: every change is an event, verify finds tampering, and
concurrent writers never fork the chain."""

from __future__ import annotations

import itertools
import threading

import pytest
from sqlalchemy import select, text

from service.db import session_scope
from service.trail import service as trail
from service.trail.models import AuditEvent
from tests.conftest import auth, qa_body, submit
from tests.service import factories as f


def _append(session, n: int, prefix: str = "t") -> None:
    for i in range(n):
        trail.record(
            session,
            actor="test",
            event_type="test.event",
            object_type="test",
            object_id=f"{prefix}{i}",
            details={"i": i},
        )


def test_chain_links_every_event_to_the_previous_one(db):
    _append(db, 5)
    events = db.scalars(select(AuditEvent).order_by(AuditEvent.seq)).all()
    assert events[0].prev_hash == trail.GENESIS
    for a, b in itertools.pairwise(events):
        assert b.prev_hash == a.hash and b.seq == a.seq + 1
    result = trail.verify(db)
    assert result.ok and result.events_checked == len(events)


@pytest.mark.parametrize(
    "tamper",
    [
        "UPDATE audit_events SET details = '{\"i\": 99}' WHERE seq = :seq",
        "UPDATE audit_events SET actor = 'someone-else' WHERE seq = :seq",
        "UPDATE audit_events SET event_type = 'test.other' WHERE seq = :seq",
        "UPDATE audit_events SET occurred_at = occurred_at - interval '1 hour' WHERE seq = :seq",
        "DELETE FROM audit_events WHERE seq = :seq",
    ],
)
def test_verify_reports_the_first_altered_row(db, tamper):
    _append(db, 6)
    target = db.scalars(select(AuditEvent.seq).order_by(AuditEvent.seq)).all()[3]
    db.execute(text(tamper), {"seq": target})
    db.expire_all()
    result = trail.verify(db)
    assert not result.ok
    # A deleted row shows as a gap at the row after it; an edited row at itself.
    assert result.first_broken_seq in (target, target + 1)
    assert result.problem


def test_rewriting_a_row_and_its_hash_still_breaks_the_next_link(db):
    _append(db, 4)
    seqs = db.scalars(select(AuditEvent.seq).order_by(AuditEvent.seq)).all()
    db.execute(
        text("UPDATE audit_events SET hash = :h WHERE seq = :s"), {"h": "f" * 64, "s": seqs[1]}
    )
    db.expire_all()
    result = trail.verify(db)
    assert not result.ok and result.first_broken_seq == seqs[1]


def test_verify_endpoint_reports_a_row_altered_in_the_database(client, keys, model, db):
    rid = submit(client, keys.a, qa_body()).json()["id"]
    ok = client.get("/v1/audit/verify", headers=auth(keys.admin)).json()
    assert ok["ok"] is True and ok["events_checked"] >= 3
    seq = db.scalar(select(AuditEvent.seq).where(AuditEvent.object_id == rid))
    db.execute(text("UPDATE audit_events SET details = '{}' WHERE seq = :s"), {"s": seq})
    db.expire_all()
    broken = client.get("/v1/audit/verify", headers=auth(keys.admin)).json()
    assert broken["ok"] is False and broken["first_broken_seq"] == seq


def test_state_changes_key_creation_and_purge_are_events(client, keys, model, db):
    rid = submit(client, keys.a, qa_body()).json()["id"]
    client.post(f"/v1/erasure-requests/{rid}/cancel", headers=auth(keys.a))
    types = [e.event_type for e in db.scalars(select(AuditEvent).order_by(AuditEvent.seq))]
    assert types.count("api_key.created") == 4
    assert "model.registered" in types
    on_request = [
        e.event_type
        for e in db.scalars(
            select(AuditEvent).where(AuditEvent.object_id == rid).order_by(AuditEvent.seq)
        )
    ]
    assert on_request == [
        "erasure_request.received",
        "erasure_request.canceled",
        "erasure_request.data_purged",
    ]


def test_trail_holds_no_personal_data(client, keys, model, db):
    body = qa_body(subject="patient-7781")
    rid = submit(client, keys.a, body).json()["id"]
    assert trail.seal_pending(db) == 1  # the intake's event, chained after its commit
    event = db.scalar(select(AuditEvent).where(AuditEvent.object_id == rid))
    dumped = str(event.details)
    assert "patient-7781" not in dumped and "Jane Roe" not in dumped
    from service.crypto import get_cipher

    assert event.details["subject"] == get_cipher().keyed_hash("patient-7781")


def test_concurrent_writers_never_fork_the_chain(live_db):
    with session_scope(live_db) as s:
        _append(s, 1, "seed")
    barrier = threading.Barrier(4)

    def writer(slot: int) -> None:
        barrier.wait()
        for i in range(15):
            with session_scope(live_db) as s:
                _append(s, 1, f"w{slot}-{i}-")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with session_scope(live_db) as s:
        seqs = s.scalars(select(AuditEvent.seq).order_by(AuditEvent.seq)).all()
        assert seqs == list(range(1, 62))
        assert trail.verify(s).ok


def test_events_endpoint_paginates_oldest_first(client, keys, model):
    for i in range(3):
        submit(client, keys.a, qa_body(subject=f"s{i}"))
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor is not None else {})}
        page = client.get("/v1/audit/events", params=params, headers=auth(keys.admin)).json()
        seen += [e["seq"] for e in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(seen) and len(seen) == len(set(seen)) >= 8


def test_factories_requests_are_recorded(db):
    who = f.principal(db)
    f.model(db)
    [req] = f.requests(db, who, 1)
    trail.seal_pending(db)  # the intake's event is chained after its commit
    assert db.scalar(select(AuditEvent).where(AuditEvent.object_id == req.id)) is not None


def test_the_dispatcher_tick_chains_pending_events(db):
    from service import dispatcher
    from service.trail.models import PendingEvent

    trail.record(
        db,
        actor="t",
        event_type="test.pending",
        object_type="test",
        object_id="p1",
        details={},
        deferred=True,
    )
    assert db.scalar(select(AuditEvent).where(AuditEvent.object_id == "p1")) is None
    report = dispatcher.tick(lambda: db)
    assert report.sealed == 1 and db.scalar(select(PendingEvent.id)) is None
    event = db.scalar(select(AuditEvent).where(AuditEvent.object_id == "p1"))
    assert event is not None and trail.verify(db).ok
