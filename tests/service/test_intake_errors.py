"""Client mistakes on intake (POST /v1/erasure-requests, POST /v1/models): each one is an
RFC 9457 problem whose detail says what to fix, never a 500, and never writes a row."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select

from service.erasure_requests.models import ErasureRequest
from service.models_registry.models import RegisteredModel
from service.trail.models import AuditEvent, PendingEvent
from tests.conftest import auth, qa_body, submit

REQUESTS = "/v1/erasure-requests"
MODELS = "/v1/models"
ONE_MIB = 1_048_576  # the default MAX_BODY_BYTES, fixed when the app is built


def _rows(db) -> dict[str, int]:
    tables = {
        "requests": ErasureRequest,
        "models": RegisteredModel,
        "audit": AuditEvent,
        "pending audit": PendingEvent,
    }
    return {k: db.scalar(select(func.count()).select_from(t)) for k, t in tables.items()}


@pytest.fixture
def unchanged(db) -> Iterator[None]:
    """Fails the test if it wrote any erasure request, model or audit event."""
    before = _rows(db)
    yield
    assert _rows(db) == before


def assert_problem(r: Any, status: int, *fragments: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert {"type", "title", "status", "detail"} <= body.keys()
    assert body["status"] == status
    assert body["type"].startswith("urn:unlearn:problem:")
    for fragment in fragments:
        assert fragment in body["detail"], body["detail"]
    return body


def _post_raw(client, token: str, path: str, content: Any, ctype: str | None) -> Any:
    headers = {**auth(token), "Idempotency-Key": uuid.uuid4().hex}
    if ctype is not None:
        headers["Content-Type"] = ctype
    return client.post(path, content=content, headers=headers)


# --- erasure requests: limits ------------------------------------------------------------


def test_too_many_items(client, keys, model, settings, unchanged):
    settings.max_items_per_request = 3
    r = submit(client, keys.a, qa_body(n=4))
    body = assert_problem(r, 422, "MAX_ITEMS_PER_REQUEST", "the limit is 3", "4 items")
    assert body["limit"] == 3 and body["field"] == "items"


def test_too_many_holdout_items(client, keys, model, settings, unchanged):
    settings.max_holdout_items = 1
    holdout = [{"text": "Some invented person likes tea."}, {"text": "Another likes coffee."}]
    r = submit(client, keys.a, qa_body(holdout=holdout))
    assert_problem(r, 422, "holdout", "MAX_HOLDOUT_ITEMS", "the limit is 1")


@pytest.mark.parametrize("field", ["items", "holdout"])
def test_item_over_max_item_bytes_names_index_and_limit(
    client, keys, model, settings, unchanged, field
):
    settings.max_item_bytes = 100
    body = qa_body(n=3)
    small = [{"text": "short"}, {"text": "short too"}]
    body["holdout"] = small
    body[field][1] = {"text": "x" * 101}
    r = submit(client, keys.a, body)
    assert_problem(r, 422, f"{field}[1]", "101 bytes", "100 bytes", "MAX_ITEM_BYTES")


def test_item_at_exactly_max_item_bytes_is_accepted(client, keys, model, settings):
    settings.max_item_bytes = 100
    r = submit(client, keys.a, qa_body(items=[{"prompt": "p" * 50, "completion": "c" * 50}]))
    assert r.status_code == 202, r.text


@pytest.mark.parametrize("path", [REQUESTS, MODELS])
def test_body_over_max_body_bytes_with_content_length_is_413(client, keys, model, unchanged, path):
    content = json.dumps(qa_body(subject="x" * (ONE_MIB + 1))).encode()
    r = _post_raw(client, keys.admin, path, content, "application/json")
    body = assert_problem(r, 413, "MAX_BODY_BYTES", str(ONE_MIB))
    assert body["limit"] == ONE_MIB


@pytest.mark.parametrize("path", [REQUESTS, MODELS])
def test_chunked_body_over_max_body_bytes_is_413(client, keys, model, unchanged, path):
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "support", "subject_ref": "'
        for _ in range(17):
            yield b"x" * 65_536
        yield b'", "items": [{"text": "t"}]}'

    r = _post_raw(client, keys.admin, path, chunks(), "application/json")
    assert "content-length" not in r.request.headers
    assert r.request.headers["transfer-encoding"] == "chunked"
    assert_problem(r, 413, "MAX_BODY_BYTES", str(ONE_MIB))


# --- erasure requests: the body's envelope ----------------------------------------------


@pytest.mark.parametrize("path", [REQUESTS, MODELS])
def test_wrong_content_type_is_415(client, keys, model, unchanged, path):
    r = _post_raw(client, keys.admin, path, json.dumps(qa_body()), "text/plain")
    assert_problem(r, 415, "application/json", "text/plain")


@pytest.mark.parametrize("path", [REQUESTS, MODELS])
def test_no_content_type_is_415(client, keys, model, unchanged, path):
    r = _post_raw(client, keys.admin, path, json.dumps(qa_body()).encode(), None)
    assert "content-type" not in r.request.headers
    assert_problem(r, 415, "application/json", "no Content-Type")


@pytest.mark.parametrize("path", [REQUESTS, MODELS])
def test_malformed_json_is_400(client, keys, model, unchanged, path):
    r = _post_raw(client, keys.admin, path, '{"model": "support", ', "application/json")
    assert_problem(r, 400, "not valid JSON")


def test_an_empty_body_is_400_saying_so(client, keys, model, unchanged):
    r = _post_raw(client, keys.a, REQUESTS, b"", "application/json")
    assert_problem(r, 400, "empty", "JSON object")


def test_json_that_is_not_an_object_is_422(client, keys, model, unchanged):
    r = submit(client, keys.a, [qa_body()])  # type: ignore[arg-type]
    assert_problem(r, 422, "body", "object")


def test_idempotency_key_too_long_is_422(client, keys, model, unchanged):
    r = submit(client, keys.a, qa_body(), key="k" * 256)
    assert_problem(r, 422, "Idempotency-Key", "255")


# --- erasure requests: fields -------------------------------------------------------------

BAD_BODIES = {
    "missing fields": ({"model": "support"}, ["subject_ref: Field required", "items: Field"]),
    "empty items": (qa_body(n=0), ["items", "at least 1"]),
    "text and prompt": (
        qa_body(items=[{"text": "t", "prompt": "p", "completion": "c"}]),
        ["items.0", "not both"],
    ),
    "prompt without completion": (
        qa_body(items=[{"prompt": "What is Jane's fact?"}]),
        ["items.0", "'completion'"],
    ),
    "empty completion": (
        qa_body(items=[{"prompt": "p", "completion": ""}]),
        ["items.0.completion", "at least 1"],
    ),
    "unknown extra field": (qa_body(colour="red"), ["colour", "Extra inputs"]),
    "unknown item field": (
        qa_body(items=[{"text": "t", "lang": "en"}]),
        ["items.0.lang", "Extra inputs"],
    ),
    "unknown method name": (qa_body(method={"name": "forget-harder"}), ["method", "npo"]),
    "method without name": (qa_body(method={"beta": 0.1}), ["method", "name"]),
    "unknown method parameter": (
        qa_body(method={"name": "npo", "betta": 0.1}),
        ["method.npo.betta", "Extra inputs"],
    ),
    "method parameter out of range": (
        qa_body(method={"name": "npo", "lr": 1.0}),
        ["method.npo.lr", "0.01"],
    ),
    "negative beta": (qa_body(method={"name": "npo", "beta": -1}), ["method.npo.beta", "0"]),
    "subject_ref too long": (qa_body(subject="s" * 256), ["subject_ref", "255"]),
    "empty subject_ref": (qa_body(subject=""), ["subject_ref", "at least 1"]),
    "model name too long": (qa_body(model="m" * 101), ["model", "100"]),
    "items not a list": (qa_body(items={"text": "t"}), ["items", "array"]),
}


@pytest.mark.parametrize(("body", "fragments"), BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_invalid_body_is_422_naming_the_field(client, keys, model, unchanged, body, fragments):
    r = submit(client, keys.a, body)
    problem = assert_problem(r, 422, *fragments)
    assert problem["errors"] and all("field" in e and "message" in e for e in problem["errors"])


def test_unknown_model_is_404(client, keys, model, unchanged):
    r = submit(client, keys.a, qa_body(model="no-such-model"))
    assert_problem(r, 404, "model", "'no-such-model'")


def test_nul_character_in_model_name_is_not_a_500(client, keys, model, unchanged):
    r = submit(client, keys.a, qa_body(model="supp\x00ort"))
    assert r.status_code in (404, 422), r.text
    assert r.headers["content-type"] == "application/problem+json"


# --- models registry ---------------------------------------------------------------------


def _register(client, token: str, **body: Any) -> Any:
    return client.post(MODELS, json=body, headers=auth(token))


def test_registering_a_model_needs_admin(client, keys, unchanged):
    r = _register(client, keys.a, name="mine")
    assert_problem(r, 403, "'admin'")


def test_duplicate_model_name_is_409(client, keys, model, unchanged):
    r = _register(client, keys.admin, name=model)
    assert_problem(r, 409, f"{model!r}")


@pytest.mark.parametrize("kind", ["missing", "relative", "no config.json"])
def test_source_neither_builtin_nor_model_folder_is_422(client, keys, tmp_path, unchanged, kind):
    source = {
        "missing": str(tmp_path / "nowhere"),
        "relative": "models/llama",
        "no config.json": str(tmp_path),
    }[kind]
    r = _register(client, keys.admin, name="m1", source=source)
    assert_problem(r, 422, "config.json", "absolute path", repr(source))


def test_unknown_builtin_is_422(client, keys, unchanged):
    r = _register(client, keys.admin, name="m1", source="builtin:gpt-17")
    assert_problem(r, 422, "'builtin:gpt-17'", "builtin:smollm2-135m-instruct")


@pytest.mark.parametrize("name", ["-leading-dash", "has space", "slash/name", "", "n" * 101])
def test_invalid_model_name_is_422(client, keys, unchanged, name):
    r = _register(client, keys.admin, name=name)
    assert_problem(r, 422, "name")


def test_too_many_retain_items_is_422(client, keys, settings, unchanged):
    settings.max_retain_items = 1
    retain = [{"text": "one"}, {"text": "two"}]
    r = _register(client, keys.admin, name="m1", retain=retain)
    assert_problem(r, 422, "MAX_RETAIN_ITEMS", "the limit is 1")


def test_invalid_default_method_is_422(client, keys, unchanged):
    r = _register(client, keys.admin, name="m1", default_method={"name": "rmu", "layer": -1})
    assert_problem(r, 422, "default_method.rmu.layer")


def test_out_of_range_audit_policy_is_422(client, keys, unchanged):
    r = _register(client, keys.admin, name="m1", audit_policy={"max_value_leak": 2})
    assert_problem(r, 422, "audit_policy.max_value_leak")


def test_model_folder_with_config_json_registers_and_lists(client, keys, tmp_path, db):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    before = _rows(db)
    r = _register(client, keys.admin, name="local-llama", source=str(tmp_path))
    assert r.status_code == 201, r.text
    assert r.headers["location"] == "/v1/models/local-llama"
    assert r.json()["source"] == str(tmp_path)
    after = _rows(db)
    assert after["models"] == before["models"] + 1
    assert after["audit"] == before["audit"] + 1

    listed = client.get(MODELS, headers=auth(keys.a)).json()["items"]
    assert "local-llama" in [m["name"] for m in listed]
    one = client.get("/v1/models/local-llama", headers=auth(keys.a))
    assert one.status_code == 200 and one.json()["retain_count"] == 0


def test_unknown_model_get_is_404(client, keys):
    r = client.get("/v1/models/no-such-model", headers=auth(keys.a))
    assert_problem(r, 404, "'no-such-model'")


# --- routing --------------------------------------------------------------------------------


def test_unknown_route_is_404_problem(client, keys):
    r = client.get("/v1/nothing-here", headers=auth(keys.a))
    assert_problem(r, 404, "/v1/nothing-here")


def test_wrong_method_is_405_problem(client, keys, unchanged):
    r = client.delete(MODELS, headers=auth(keys.admin))
    assert_problem(r, 405)
    assert "POST" in r.headers["allow"]
