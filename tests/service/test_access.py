"""Authentication, scopes and tenant isolation across the API; operations endpoints."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service.access import service as access
from service.access.models import ApiKey
from service.dispatcher import batch_pending
from tests.conftest import auth, qa_body, submit

ROOT = Path(__file__).resolve().parents[2]
PROBLEM_KEYS = {"type", "title", "status", "detail"}


def key_id(token: str) -> str:
    return token.split("_", 2)[1]


def secret(token: str) -> str:
    return token.split("_", 2)[2]


def assert_problem(r: Any, status: int, *fragments: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body.keys() >= PROBLEM_KEYS and body["status"] == status
    for fragment in fragments:
        assert fragment in body["detail"], body["detail"]
    return body


def assert_unauthenticated(r: Any) -> None:
    assert_problem(r, 401)
    assert r.headers["www-authenticate"].startswith("Bearer")


@pytest.fixture
def request_of_a(client, keys, model) -> str:
    r = submit(client, keys.a, qa_body(subject="cust-a"))
    assert r.status_code == 202, r.text
    return r.json()["id"]


# --- authentication ------------------------------------------------------------------------


def test_no_key_is_401_with_challenge(client, keys):
    r = client.get("/v1/erasure-requests")
    assert_unauthenticated(r)
    assert "Authorization: Bearer" in r.json()["detail"]


def test_non_bearer_scheme_is_401(client, keys):
    r = client.get("/v1/erasure-requests", headers={"Authorization": f"Basic {keys.a}"})
    assert_unauthenticated(r)


@pytest.mark.parametrize(
    "make_token",
    [
        lambda k: "not-a-key",
        lambda k: "ulk_only-two-parts",
        lambda k: k.replace("ulk_", "xyz_", 1),
        lambda k: f"ulk_000000000000_{secret(k)}",  # unknown key id
        lambda k: f"ulk_{key_id(k)}_{secret(k)[:-1]}x",  # right id, wrong secret
        lambda k: f"ulk_{key_id(k)}_",  # right id, empty secret
    ],
    ids=["garbage", "two-parts", "wrong-prefix", "unknown-id", "wrong-secret", "empty-secret"],
)
def test_bad_keys_are_401(client, keys, make_token):
    token = make_token(keys.a)
    assert token != keys.a
    r = client.get("/v1/erasure-requests", headers=auth(token))
    assert_unauthenticated(r)
    assert r.json()["type"] == "urn:unlearn:problem:invalid-key"


def test_a_bad_key_is_401_before_the_body_is_judged(client, keys):
    """Authentication comes first: an unknown key with a malformed body learns nothing
    about the body."""
    r = client.post(
        "/v1/erasure-requests",
        json={"items": "not a list"},
        headers=auth(keys.a + "x") | {"Idempotency-Key": "k"},
    )
    assert_unauthenticated(r)
    assert r.json()["type"] == "urn:unlearn:problem:invalid-key"


def test_revoked_key_is_401(client, keys, db):
    assert client.get("/v1/erasure-requests", headers=auth(keys.a)).status_code == 200
    assert access.revoke_key(db, key_id=key_id(keys.a))
    db.commit()
    assert_unauthenticated(client.get("/v1/erasure-requests", headers=auth(keys.a)))
    # Tenant B's key is untouched.
    assert client.get("/v1/erasure-requests", headers=auth(keys.b)).status_code == 200


def test_x_api_key_header_works(client, keys):
    r = client.get("/v1/erasure-requests", headers={"X-API-Key": keys.a})
    assert r.status_code == 200, r.text
    bad = client.get("/v1/erasure-requests", headers={"X-API-Key": keys.a + "x"})
    assert_unauthenticated(bad)


def test_stored_key_row_holds_only_the_secret_digest(keys, db):
    row = db.get(ApiKey, key_id(keys.a))
    stored = " ".join(str(getattr(row, c.key)) for c in ApiKey.__table__.columns)
    assert secret(keys.a) not in stored
    assert keys.a not in stored
    assert row.secret_sha256 == hashlib.sha256(secret(keys.a).encode()).hexdigest()


# --- scopes --------------------------------------------------------------------------------


def test_read_only_key_cannot_submit(client, keys, model, db):
    r = submit(client, keys.a_read_only, qa_body())
    body = assert_problem(r, 403, "'requests:write'")
    assert body["required_scope"] == "requests:write"
    assert client.get("/v1/erasure-requests", headers=auth(keys.a_read_only)).status_code == 200


def test_client_key_cannot_register_models(client, keys):
    r = client.post("/v1/models", json={"name": "mine"}, headers=auth(keys.a))
    assert_problem(r, 403, "'admin'")


def test_key_without_read_scope_cannot_read_requests(client, keys, db, request_of_a):
    writer = access.mint_key(db, tenant_name="acme", scopes=["requests:write"], name="w")
    db.commit()
    r = client.get(f"/v1/erasure-requests/{request_of_a}", headers=auth(writer.token))
    assert_problem(r, 403, "'requests:read'")


# --- tenants -------------------------------------------------------------------------------


def test_other_tenants_request_looks_missing(client, keys, request_of_a):
    assert client.get(f"/v1/erasure-requests/{request_of_a}", headers=auth(keys.a)).is_success
    foreign = client.get(f"/v1/erasure-requests/{request_of_a}", headers=auth(keys.b))
    missing = client.get("/v1/erasure-requests/no-such-id", headers=auth(keys.b))
    a, m = assert_problem(foreign, 404), assert_problem(missing, 404)
    assert a.keys() == m.keys()
    assert (a["type"], a["title"]) == (m["type"], m["title"])
    assert a["detail"] == m["detail"].replace("no-such-id", request_of_a)


def test_lists_are_per_tenant_and_admin_sees_all(client, keys, request_of_a):
    of_b = submit(client, keys.b, qa_body(subject="cust-b")).json()["id"]

    def listed(token: str) -> set[str]:
        page = client.get("/v1/erasure-requests", headers=auth(token)).json()
        return {item["id"] for item in page["items"]}

    assert listed(keys.a) == {request_of_a}
    assert listed(keys.b) == {of_b}
    assert listed(keys.admin) == {request_of_a, of_b}


def test_admin_reads_any_tenants_request(client, keys, request_of_a):
    r = client.get(f"/v1/erasure-requests/{request_of_a}", headers=auth(keys.admin))
    assert r.status_code == 200 and r.json()["subject_ref"] == "cust-a"


# --- jobs ----------------------------------------------------------------------------------


@pytest.fixture
def job_of_a(db, request_of_a) -> str:
    created = batch_pending(db)
    db.commit()
    assert len(created) == 1
    return created[0]


def test_job_is_visible_only_to_tenants_with_a_request_in_it(client, keys, db, job_of_a):
    mine = client.get(f"/v1/jobs/{job_of_a}", headers=auth(keys.a))
    assert mine.status_code == 200, mine.text
    assert mine.json()["id"] == job_of_a and len(mine.json()["requests"]) == 1

    foreign = client.get(f"/v1/jobs/{job_of_a}", headers=auth(keys.b))
    missing = client.get("/v1/jobs/no-such-job", headers=auth(keys.b))
    assert_problem(foreign, 404)
    assert foreign.json()["detail"] == missing.json()["detail"].replace("no-such-job", job_of_a)

    assert client.get(f"/v1/jobs/{job_of_a}", headers=auth(keys.admin)).status_code == 200


def test_job_needs_requests_read(client, keys, db, job_of_a):
    auditor = access.mint_key(db, tenant_name="acme", scopes=["audit:read"], name="aud")
    db.commit()
    r = client.get(f"/v1/jobs/{job_of_a}", headers=auth(auditor.token))
    assert_problem(r, 403, "'requests:read'")
    assert client.get(f"/v1/jobs/{job_of_a}", headers=auth(keys.a_read_only)).status_code == 200


def test_job_needs_a_key(client, job_of_a):
    assert_unauthenticated(client.get(f"/v1/jobs/{job_of_a}"))


# --- audit trail ---------------------------------------------------------------------------


def _event_objects(client, token: str) -> set[str]:
    r = client.get("/v1/audit/events", params={"limit": 500}, headers=auth(token))
    assert r.status_code == 200, r.text
    return {e["object_id"] for e in r.json()["items"]}


def test_audit_events_need_audit_read(client, keys):
    r = client.get("/v1/audit/events", headers=auth(keys.a_read_only))
    assert_problem(r, 403, "'audit:read'")
    assert_unauthenticated(client.get("/v1/audit/events"))


def test_tenant_sees_only_its_own_audit_events(client, keys, request_of_a):
    of_b = submit(client, keys.b, qa_body(subject="cust-b")).json()["id"]
    seen_by_a = _event_objects(client, keys.a)
    seen_by_b = _event_objects(client, keys.b)
    assert request_of_a in seen_by_a and of_b not in seen_by_a
    assert of_b in seen_by_b and request_of_a not in seen_by_b
    # Another tenant's keys are not A's business either.
    assert key_id(keys.b) not in seen_by_a and key_id(keys.a) in seen_by_a


def test_tenant_cannot_read_another_tenants_events_by_object_id(client, keys, request_of_a):
    r = client.get("/v1/audit/events", params={"object_id": request_of_a}, headers=auth(keys.b))
    assert r.status_code == 200 and r.json()["items"] == []


def test_admin_sees_every_audit_event(client, keys, model, request_of_a):
    of_b = submit(client, keys.b, qa_body(subject="cust-b")).json()["id"]
    seen = _event_objects(client, keys.admin)
    assert {request_of_a, of_b, key_id(keys.a), key_id(keys.b)} <= seen
    # Tenant-less events, such as a model registration, are visible to admins only.
    registered = client.get(
        "/v1/audit/events", params={"event_type": "model.registered"}, headers=auth(keys.admin)
    ).json()["items"]
    assert len(registered) == 1
    assert registered[0]["object_id"] not in _event_objects(client, keys.a)


def test_audit_verify_needs_audit_read(client, keys, request_of_a):
    assert_problem(client.get("/v1/audit/verify", headers=auth(keys.a_read_only)), 403)
    assert_unauthenticated(client.get("/v1/audit/verify"))
    r = client.get("/v1/audit/verify", headers=auth(keys.a))
    assert r.status_code == 200, r.text
    assert r.json()["ok"] is True and r.json()["events_checked"] > 0


# --- operations ----------------------------------------------------------------------------


def test_healthz_needs_no_key(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_metrics_expose_request_and_queue_gauges(client):
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert "# TYPE unlearn_erasure_requests gauge" in r.text
    assert "# TYPE unlearn_queue_depth gauge" in r.text
    assert 'unlearn_erasure_requests{status="received"}' in r.text


def test_gateway_import_does_not_load_torch():
    code = "import sys, service.main; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
