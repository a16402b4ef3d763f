"""Intake, reading, listing, ETags, idempotency and cancel over HTTP (PostgreSQL)."""

from __future__ import annotations

import json
import re
from datetime import datetime

from dateutil.relativedelta import relativedelta
from sqlalchemy import func, select

from service.crypto import canonical_json, sha256_hex
from service.erasure_requests.models import ErasureRequest
from tests.conftest import auth, qa_body, submit


def _count(db) -> int:
    return db.scalar(select(func.count()).select_from(ErasureRequest))


def test_submit_answers_202_with_location_and_due_date(client, keys, model, db):
    r = submit(client, keys.a, qa_body(n=3))
    assert r.status_code == 202, r.text
    body = r.json()
    assert r.headers["location"] == f"/v1/erasure-requests/{body['id']}"
    assert body["status"] == "received"
    assert body["item_count"] == 3 and body["holdout_count"] == 0
    received = datetime.fromisoformat(body["received_at"])
    assert datetime.fromisoformat(body["due_at"]) == received + relativedelta(months=1)
    assert body["links"]["cancel"].endswith("/cancel")
    assert "items" not in body  # never returned after submission
    assert _count(db) == 1


def test_item_digests_let_the_client_check_its_items(client, keys, model):
    body = qa_body(n=2)
    out = submit(client, keys.a, body).json()
    salt = bytes.fromhex(out["item_digests"]["salt"])
    expected = [sha256_hex(salt + canonical_json(item)) for item in body["items"]]
    assert out["item_digests"]["items"] == expected


def test_due_date_is_one_calendar_month_at_month_end(client, keys, model, db):
    out = submit(client, keys.a, qa_body()).json()
    req = db.get(ErasureRequest, out["id"])
    req.received_at = datetime.fromisoformat("2027-01-31T10:00:00+00:00")
    # relativedelta clamps to the last day of February, as a calendar month should.
    assert req.received_at + relativedelta(months=1) == datetime.fromisoformat(
        "2027-02-28T10:00:00+00:00"
    )


def test_same_key_same_body_returns_the_same_request(client, keys, model, db):
    first = submit(client, keys.a, qa_body(), key="same-key")
    again = submit(client, keys.a, qa_body(), key="same-key")
    assert again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert _count(db) == 1


def test_same_key_other_body_is_422(client, keys, model, db):
    submit(client, keys.a, qa_body(n=1), key="k")
    r = submit(client, keys.a, qa_body(n=2), key="k")
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/problem+json"
    assert "different body" in r.json()["detail"]
    assert _count(db) == 1


def test_idempotency_keys_are_per_tenant(client, keys, model, db):
    a = submit(client, keys.a, qa_body(), key="shared")
    b = submit(client, keys.b, qa_body(), key="shared")
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] != b.json()["id"]


def test_missing_idempotency_key_is_400(client, keys, model, db):
    r = client.post("/v1/erasure-requests", json=qa_body(), headers=auth(keys.a))
    assert r.status_code == 400
    assert "Idempotency-Key" in r.json()["detail"]
    assert _count(db) == 0


def test_get_with_etag_and_304(client, keys, model):
    rid = submit(client, keys.a, qa_body()).json()["id"]
    r = client.get(f"/v1/erasure-requests/{rid}", headers=auth(keys.a))
    assert r.status_code == 200
    etag = r.headers["etag"]
    r2 = client.get(f"/v1/erasure-requests/{rid}", headers={**auth(keys.a), "If-None-Match": etag})
    assert r2.status_code == 304 and r2.content == b""
    client.post(f"/v1/erasure-requests/{rid}/cancel", headers=auth(keys.a))
    r3 = client.get(f"/v1/erasure-requests/{rid}", headers={**auth(keys.a), "If-None-Match": etag})
    assert r3.status_code == 200 and r3.headers["etag"] != etag
    assert r3.json()["status"] == "canceled"


def test_cursor_pagination_walks_every_request_once(client, keys, model):
    ids = {submit(client, keys.a, qa_body(subject=f"s{i}")).json()["id"] for i in range(7)}
    submit(client, keys.b, qa_body())  # another tenant's: never listed for A
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/erasure-requests", params=params, headers=auth(keys.a)).json()
        seen += [item["id"] for item in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert len(seen) == len(set(seen)) == 7 and set(seen) == ids
    received = [
        client.get(f"/v1/erasure-requests/{i}", headers=auth(keys.a)).json()["received_at"]
        for i in seen
    ]
    assert received == sorted(received, reverse=True)


def test_list_filters_by_status_and_model(client, keys, model):
    keep = submit(client, keys.a, qa_body(subject="x")).json()["id"]
    gone = submit(client, keys.a, qa_body(subject="y")).json()["id"]
    client.post(f"/v1/erasure-requests/{gone}/cancel", headers=auth(keys.a))
    page = client.get(
        "/v1/erasure-requests", params={"status": "received"}, headers=auth(keys.a)
    ).json()
    assert [i["id"] for i in page["items"]] == [keep]
    page = client.get(
        "/v1/erasure-requests", params={"model": "support"}, headers=auth(keys.a)
    ).json()
    assert {i["id"] for i in page["items"]} == {keep, gone}
    bad = client.get("/v1/erasure-requests", params={"status": "nope"}, headers=auth(keys.a))
    assert bad.status_code == 422
    unknown = client.get("/v1/erasure-requests", params={"model": "x"}, headers=auth(keys.a))
    assert unknown.status_code == 404


def test_invalid_cursor_is_400(client, keys, model):
    r = client.get("/v1/erasure-requests", params={"cursor": "garbage"}, headers=auth(keys.a))
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/problem+json"


def test_cancel_received_request_purges_its_items(client, keys, model, db):
    rid = submit(client, keys.a, qa_body()).json()["id"]
    r = client.post(f"/v1/erasure-requests/{rid}/cancel", headers=auth(keys.a))
    assert r.status_code == 200
    assert r.json()["status"] == "canceled" and r.json()["data_purged_at"] is not None
    row = db.get(ErasureRequest, rid)
    db.refresh(row)
    assert row.items_ciphertext is None
    again = client.post(f"/v1/erasure-requests/{rid}/cancel", headers=auth(keys.a))
    assert again.status_code == 409
    assert again.json()["status_now"] == "canceled"


def test_cancel_needs_write_scope_and_own_tenant(client, keys, model):
    rid = submit(client, keys.a, qa_body()).json()["id"]
    assert (
        client.post(f"/v1/erasure-requests/{rid}/cancel", headers=auth(keys.b)).status_code == 404
    )
    ro = client.post(f"/v1/erasure-requests/{rid}/cancel", headers=auth(keys.a_read_only))
    assert ro.status_code == 403


def test_admin_rejects_a_request_with_a_reason(client, keys, model, db):
    rid = submit(client, keys.a, qa_body()).json()["id"]
    refused = client.post(
        f"/v1/erasure-requests/{rid}/reject", json={"reason": "x"}, headers=auth(keys.admin)
    )
    assert refused.status_code == 422  # reason too short to be useful
    not_admin = client.post(
        f"/v1/erasure-requests/{rid}/reject",
        json={"reason": "identity not verified"},
        headers=auth(keys.a),
    )
    assert not_admin.status_code == 403
    r = client.post(
        f"/v1/erasure-requests/{rid}/reject",
        json={"reason": "identity not verified"},
        headers=auth(keys.admin),
    )
    assert r.status_code == 200
    out = r.json()
    assert out["status"] == "rejected" and out["status_reason"] == "identity not verified"
    assert out["data_purged_at"] is not None
    again = client.post(
        f"/v1/erasure-requests/{rid}/reject",
        json={"reason": "identity not verified"},
        headers=auth(keys.admin),
    )
    assert again.status_code == 409 and again.json()["status_now"] == "rejected"


def test_key_held_by_an_open_transaction_gives_409(client, keys, model, db):
    """While another transaction is writing a request with this key, answer 409 at once."""
    from sqlalchemy import text

    from service.db import get_engine

    with get_engine().connect() as other:
        other.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:t), hashtext(:k))"),
            {"t": keys.a_tenant_id, "k": "busy-key"},
        )
        r = submit(client, keys.a, qa_body(), key="busy-key")
        other.rollback()
    assert r.status_code == 409
    assert r.headers["retry-after"] == "1"
    assert r.headers["content-type"] == "application/problem+json"
    assert _count(db) == 0
    assert submit(client, keys.a, qa_body(), key="busy-key").status_code == 202


def test_readyz_reports_a_broker_that_is_down(client, settings):
    from service import queue

    assert client.get("/readyz").status_code == 200
    settings.broker_url = "redis://127.0.0.1:1/0"
    queue.producer.cache_clear()
    try:
        r = client.get("/readyz")
    finally:
        queue.producer.cache_clear()
    assert r.status_code == 503
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["checks"] == {"database": True, "broker": False}


def test_openapi_documents_the_submit_body_and_every_reference_resolves(client):
    """The intake validates its body itself (after the key); the document must still
    describe it, and every `$ref` in it must point at a schema it holds."""
    doc = client.get("/openapi.json").json()
    post = doc["paths"]["/v1/erasure-requests"]["post"]
    schema = post["requestBody"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/ErasureRequestCreate"}
    components = doc["components"]["schemas"]
    assert {"model", "subject_ref", "items"} <= set(components["ErasureRequestCreate"]["required"])
    assert "Idempotency-Key" in [p["name"] for p in post["parameters"]]
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(doc)))
    assert refs and refs <= components.keys(), refs - components.keys()
