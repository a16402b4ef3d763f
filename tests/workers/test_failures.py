"""What a worker does when things go wrong: permanent errors fail the job with a reason
a person can act on; a database that drops every connection mid-job costs nothing."""

from __future__ import annotations

import shutil

from sqlalchemy import func, select, text

from service.adapters.models import AdapterVersion
from tests.conftest import auth
from tests.workers.conftest import FAST_METHOD, FORGET, SLOW_METHOD, Stack, wait_for


def test_a_model_folder_gone_fails_the_job_with_the_reason(stack: Stack, tiny_target, tmp_path):
    folder = tmp_path / "moving-model"
    shutil.copytree(tiny_target, folder)
    r = stack.client.post(
        "/v1/models",
        json={"name": "moving", "source": str(folder)},
        headers=auth(stack.keys.admin),
    )
    assert r.status_code == 201, r.text
    (folder / "config.json").unlink()  # an operator moved the model away
    stack.model = "moving"
    stack.start_worker()
    rid = stack.submit(FORGET, method=FAST_METHOD)
    done = stack.wait_status(rid, {"completed", "failed"})
    assert done["status"] == "failed"
    assert "is not a Hugging Face model folder" in done["status_reason"]
    job = stack.client.get(done["links"]["job"], headers=auth(stack.keys.a)).json()
    assert job["stage"] == "failed" and job["attempts"] == 1  # permanent: not retried


def test_a_worker_with_another_encryption_key_fails_the_job_saying_so(stack: Stack):
    stack.env["DATA_ENCRYPTION_KEY"] = "YW5vdGhlci1rZXktYW5vdGhlci1rZXktYW5vdGhlciE="
    stack.start_worker()
    rid = stack.submit(FORGET, method=FAST_METHOD)
    done = stack.wait_status(rid, {"completed", "failed"})
    assert done["status"] == "failed"
    assert "DATA_ENCRYPTION_KEY differs" in done["status_reason"]


def test_database_connections_dropped_mid_job_cost_nothing(stack: Stack):
    stack.start_worker()
    rid = stack.submit(FORGET, method=SLOW_METHOD)
    job_id = wait_for("a job", lambda: stack.request(rid).get("job_id"))
    wait_for(
        "training",
        lambda: list((stack.tmp / "work" / job_id).glob("*/round0/checkpoint.pt")),
        timeout=120,
    )
    with stack.sessions() as s:
        killed = s.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalar()
        s.commit()
    assert killed >= 1  # the worker's connections (and the dispatcher's) went away
    done = stack.wait_status(rid, {"completed", "failed"}, timeout=240)
    assert done["status"] == "completed", (done, stack.logs())
    with stack.sessions() as s:
        assert s.scalar(select(func.count()).select_from(AdapterVersion)) == 1
    job = stack.client.get(done["links"]["job"], headers=auth(stack.keys.a)).json()
    assert job["attempts"] == 1
