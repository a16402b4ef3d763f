"""Adapter versions: numbering, publication in one transaction, quarantine, the
manifest and download endpoints, the store and the archive."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading
import uuid

import pytest

from service import dispatcher
from service.adapters import archive
from service.adapters import service as adapters
from service.adapters.models import AdapterVersion
from service.adapters.store import FileSystemStore, get_store
from service.jobs import service as jobs
from service.jobs.models import Job
from service.states import JobStage
from tests.conftest import auth
from tests.service import factories as f

J = JobStage
FAIL = {
    "name": "forget_prob_ratio",
    "value": 0.9,
    "threshold": 0.5,
    "passed": False,
    "message": "forget probability fell to 0.900 of its value before (must be at most 0.5)",
}


@pytest.fixture
def store(tmp_path, settings):
    settings.artifact_root = tmp_path / "artifacts"
    get_store.cache_clear()
    yield get_store()
    get_store.cache_clear()


def staged(tmp_path, *, passed: bool = True) -> adapters.Staged:
    folder = tmp_path / uuid.uuid4().hex
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 8, "peft_type": "LORA"}')
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(256))
    verdict = {
        "passed": passed,
        "criteria": [FAIL] if not passed else [],
        "failed": [] if passed else [FAIL],
    }
    return adapters.Staged(
        folder=folder,
        record={
            "method": {"name": "npo", "lr": 5e-4},
            "base_model": {"digest": "sha256:" + "ab" * 32},
        },
        audit={"verdict": verdict, "summary": {"forget_prob": {"before": 0.8, "after": 0.1}}},
    )


def packaging_job(db, who, model: str = "support") -> Job:
    f.requests(db, who, 1, model)
    [job_id] = dispatcher.batch_pending(db)
    job = jobs.claim(db, job_id=job_id, worker_id="w1")
    assert job is not None
    for stage in (J.TRAINING, J.EVALUATING, J.PACKAGING):
        jobs.advance(db, job, stage, actor="w1")
    return job


def publish(db, job, tmp_path, store, *, passed: bool = True) -> AdapterVersion:
    return adapters.publish(
        db, job=job, staged=staged(tmp_path, passed=passed), store=store, actor="w1"
    )


@pytest.fixture
def who(db, keys):
    return f.principal(db)


def test_versions_chain_and_requests_complete(db, client, keys, model, who, tmp_path, store):
    job1 = packaging_job(db, who)
    v1 = publish(db, job1, tmp_path, store)
    assert (v1.version, v1.parent_version, v1.status) == (1, None, "published")
    assert job1.stage == "succeeded"
    [req] = jobs.requests_of(db, job1.id)
    assert (req.status, req.adapter_version) == ("completed", 1)

    job2 = packaging_job(db, who)
    assert job2.parent_version == 1  # the claim fixed the parent
    v2 = publish(db, job2, tmp_path, store)
    assert (v2.version, v2.parent_version) == (2, 1)
    # Publishing a job again returns its version: no second row.
    assert publish(db, job2, tmp_path, store).id == v2.id

    listing = client.get("/v1/models/support/adapters", headers=auth(keys.a)).json()
    assert [(i["version"], i["downloadable"]) for i in listing["items"]] == [(1, True), (2, True)]
    assert listing["latest"] == 2
    for name, digest in v2.files.items():
        data = (store.root / v2.storage_prefix / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest


def test_download_serves_the_archive_with_its_digests(
    db, client, keys, model, who, tmp_path, store
):
    v1 = publish(db, packaging_job(db, who), tmp_path, store)
    r = client.get("/v1/models/support/adapters/latest/download", headers=auth(keys.a))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/gzip"
    assert 'filename="support-v1.tar.gz"' in r.headers["content-disposition"]
    assert hashlib.sha256(r.content).hexdigest() == v1.archive_sha256
    assert int(r.headers["content-length"]) == len(r.content) == v1.archive_bytes
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        assert tar.getnames() == list(archive.MEMBERS)
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        for name, digest in manifest["files"].items():
            member = tar.extractfile(name)
            assert member is not None
            assert hashlib.sha256(member.read()).hexdigest() == digest
    assert manifest["version"] == 1 and manifest["model"] == "support"
    assert manifest["base_model"]["digest"] == "sha256:" + "ab" * 32
    assert manifest["verdict"]["passed"] is True
    assert manifest["metrics"] == {"forget_prob": {"before": 0.8, "after": 0.1}}


def test_quarantined_version_is_listed_but_never_downloadable(
    db, client, keys, model, who, tmp_path, store
):
    job = packaging_job(db, who)
    v1 = publish(db, job, tmp_path, store, passed=False)
    assert (v1.status, job.stage) == ("quarantined", "failed")
    [req] = jobs.requests_of(db, job.id)
    assert req.status == "failed" and "quarantined as version 1" in req.status_reason
    assert "forget probability fell to 0.900" in req.status_reason

    r = client.get("/v1/models/support/adapters/1/download", headers=auth(keys.a))
    assert r.status_code == 409
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["failed_criteria"][0]["name"] == "forget_prob_ratio"
    assert "failed its audit" in r.json()["detail"]
    r = client.get("/v1/models/support/adapters/latest", headers=auth(keys.a))
    assert r.status_code == 404 and r.json()["type"].endswith("no-passing-adapter")
    one = client.get("/v1/models/support/adapters/1", headers=auth(keys.a)).json()
    assert one["downloadable"] is False and one["verdict"]["failed"][0]["threshold"] == 0.5

    # The next job trains from the base model again (no passing version), as version 2.
    job2 = packaging_job(db, who)
    assert job2.parent_version is None
    assert publish(db, job2, tmp_path, store).version == 2


def test_a_job_trained_from_an_outdated_parent_is_refused(db, model, who, tmp_path, store):
    publish(db, packaging_job(db, who), tmp_path, store)
    job = packaging_job(db, who)
    job.parent_version = None  # as if it had started before version 1 existed
    with pytest.raises(adapters.StaleParent):
        publish(db, job, tmp_path, store)


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v1/models/support/adapters/abc", 422),
        ("/v1/models/support/adapters/0", 422),
        ("/v1/models/support/adapters/7", 404),
        ("/v1/models/nope/adapters", 404),
        ("/v1/models/support/adapters/latest/download", 404),
    ],
)
def test_bad_addresses_get_problems(client, keys, model, path, status):
    r = client.get(path, headers=auth(keys.a))
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"


def test_download_needs_its_scope(db, client, keys, model, who, tmp_path, store):
    publish(db, packaging_job(db, who), tmp_path, store)
    r = client.get("/v1/models/support/adapters/1/download", headers=auth(keys.a_read_only))
    assert r.status_code == 403
    r = client.get("/v1/models/support/adapters", headers=auth(keys.a_read_only))
    assert r.status_code == 403


def test_concurrent_publishes_for_one_model_get_consecutive_versions(live_db, tmp_path, store):
    with live_db() as s:
        who = f.principal(s)
        f.model(s)
        job_ids = []
        for _ in range(4):
            f.requests(s, who, 1)
            [job_id] = dispatcher.batch_pending(s)
            job = s.get(Job, job_id)
            for stage in (J.PREPARING, J.TRAINING, J.EVALUATING, J.PACKAGING):
                jobs.advance(s, job, stage, actor="w")
            job_ids.append(job_id)
        s.commit()
    barrier = threading.Barrier(len(job_ids))
    versions: list[int] = []
    errors: list[BaseException] = []

    def run(job_id: str) -> None:
        try:
            with live_db() as s:
                barrier.wait()
                # Failing verdicts: no passing parent appears, so every job may publish.
                row = publish(s, s.get(Job, job_id), tmp_path, store, passed=False)
                versions.append(row.version)
                s.commit()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(j,)) for j in job_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(versions) == [1, 2, 3, 4]


def test_store_rejects_keys_that_escape_and_leaves_no_temporary_files(tmp_path):
    store = FileSystemStore(tmp_path / "root")
    src = tmp_path / "src"
    src.write_bytes(b"x" * 10)
    for bad in ("../x", "/abs", "a//b", "a/./b", ""):
        with pytest.raises(ValueError):
            store.put_file(bad, src)
    store.put_file("a/b/c.bin", src)
    assert store.exists("a/b/c.bin") and store.size("a/b/c.bin") == 10
    assert b"".join(store.iter_bytes("a/b/c.bin")) == b"x" * 10
    assert [p.name for p in (tmp_path / "root").rglob("*") if p.is_file()] == ["c.bin"]
    store.delete_prefix("a")
    assert not store.exists("a/b/c.bin")


def test_request_audit_shows_only_its_own_items_or_says_why_there_is_none(
    db, client, keys, model, tmp_path, store
):
    who = f.principal(db)  # tenant acme, like keys.a
    reqs = f.requests(db, who, 2, "support")
    r = client.get(f"/v1/erasure-requests/{reqs[0].id}/audit", headers=auth(keys.a))
    assert r.status_code == 404 and r.json()["type"].endswith("no-audit-yet")

    [job_id] = dispatcher.batch_pending(db)
    job = jobs.claim(db, job_id=job_id, worker_id="w1")
    for stage in (J.TRAINING, J.EVALUATING, J.PACKAGING):
        jobs.advance(db, job, stage, actor="w1")
    st = staged(tmp_path, passed=False)
    st.audit["items"] = [
        {
            "request_id": reqs[0].id,
            "index": 0,
            "set": "forget",
            "before": {"prob": 0.9},
            "after": {"prob": 0.8},
        },
        {
            "request_id": reqs[1].id,
            "index": 0,
            "set": "forget",
            "before": {"prob": 0.7},
            "after": {"prob": 0.1},
        },
    ]
    adapters.publish(db, job=job, staged=st, store=store, actor="w1")
    r = client.get(f"/v1/erasure-requests/{reqs[0].id}/audit", headers=auth(keys.a))
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["version"], body["status"], body["verdict"]["passed"]) == (1, "quarantined", False)
    assert body["verdict"]["failed"] == [FAIL["message"]]
    assert [(i["index"], i["after"]["prob"], i["digest"]) for i in body["items"]] == [
        (0, 0.8, reqs[0].item_hashes[0])
    ]
    assert body["item_digest_salt"] == reqs[0].item_salt
