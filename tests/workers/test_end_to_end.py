"""A request over HTTP ends as a downloadable, audited adapter that plain PEFT loads."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.conftest import auth
from tests.workers.conftest import FAST_METHOD, FORGET, FORGET_B, Stack


def _download(stack: Stack, version: str, **headers: str):
    return stack.client.get(
        f"/v1/models/tiny/adapters/{version}/download",
        headers={**auth(stack.keys.a), **headers},
    )


def test_request_becomes_a_downloadable_adapter_that_peft_loads(stack: Stack, tmp_path):
    stack.start_worker()
    rid = stack.submit(FORGET, method=FAST_METHOD)
    done = stack.wait_status(rid, {"completed", "failed"})
    assert done["status"] == "completed", (done, stack.logs())
    assert done["adapter_version"] == 1

    listing = stack.client.get("/v1/models/tiny/adapters", headers=auth(stack.keys.a)).json()
    assert listing["latest"] == 1
    [v1] = listing["items"]
    assert v1["covered_requests"] == [rid]
    assert v1["parent_version"] is None and v1["status"] == "published"
    assert v1["verdict"]["passed"] is True
    latest = stack.client.get("/v1/models/tiny/adapters/latest", headers=auth(stack.keys.a))
    assert latest.json()["version"] == 1

    r = _download(stack, "1")
    assert r.status_code == 200, r.text
    body = r.content
    sha = hashlib.sha256(body).hexdigest()
    assert r.headers["etag"] == f'"{sha}"' == f'"{v1["archive"]["sha256"]}"'
    assert r.headers["repr-digest"] == f"sha-256=:{base64.b64encode(bytes.fromhex(sha)).decode()}:"
    assert _download(stack, "1", **{"If-None-Match": f'"{sha}"'}).status_code == 304

    folder = tmp_path / "adapter"
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
        tar.extractall(folder, filter="data")
    manifest = json.loads((folder / "manifest.json").read_text())
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    assert manifest["version"] == 1 and manifest["covered_requests"] == [rid]
    assert manifest["base_model"]["digest"] == v1["base_model"]["digest"]
    assert json.loads((folder / "audit.json").read_text())["verdict"]["passed"] is True

    # Plain PEFT: the adapter changes the model's likelihood of the forgotten answers.
    source = stack.client.get("/v1/models/tiny", headers=auth(stack.keys.a)).json()["source"]
    base = AutoModelForCausalLM.from_pretrained(source)
    model = PeftModel.from_pretrained(base, str(folder))
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        after = model(ids).logits
        with model.disable_adapter():
            before = model(ids).logits
    assert not torch.allclose(before, after)

    # The audit: full, as a page, and cut down to the request's own items.
    audit = stack.client.get("/v1/models/tiny/adapters/1/audit", headers=auth(stack.keys.a))
    assert audit.status_code == 200, audit.text
    full = audit.json()
    assert full["verdict"]["passed"] is True and full["version"] == 1
    assert {c["group"] for c in full["verdict"]["criteria"]} >= {"forgetting", "utility"}
    assert full["metrics"]["forget_prob"]["after"] < full["metrics"]["forget_prob"]["before"]
    page = stack.client.get("/v1/models/tiny/adapters/1/audit.html", headers=auth(stack.keys.a))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "PASSED" in page.text and "<svg" in page.text and "<script" not in page.text
    mine = stack.client.get(f"/v1/erasure-requests/{rid}/audit", headers=auth(stack.keys.a))
    assert mine.status_code == 200, mine.text
    own = mine.json()
    assert [i["index"] for i in own["items"]] == list(range(len(FORGET)))
    assert [i["digest"] for i in own["items"]] == done["item_digests"]["items"]
    assert all(i["after"]["prob"] < i["before"]["prob"] for i in own["items"])
    assert FORGET[0]["completion"] not in mine.text  # values and digests, never the text
    other = stack.client.get(f"/v1/erasure-requests/{rid}/audit", headers=auth(stack.keys.b))
    assert other.status_code == 404  # another tenant's request does not exist for it

    # Each download is in the trail, which still verifies.
    events = stack.client.get(
        "/v1/audit/events?event_type=adapter.downloaded", headers=auth(stack.keys.admin)
    ).json()["items"]
    assert len(events) == 1
    assert stack.client.get("/v1/audit/verify", headers=auth(stack.keys.admin)).json()["ok"]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian package chromium")
def test_the_report_page_renders_in_headless_chromium(stack: Stack, tmp_path):
    """A real run's report as a browser sees it: the verdict and every chart survive
    parsing, and nothing is fetched from elsewhere (no scripts, no fonts)."""
    stack.start_worker()
    done = stack.wait_status(stack.submit(FORGET, method=FAST_METHOD), {"completed", "failed"})
    assert done["status"] == "completed", (done, stack.logs())
    page = stack.client.get("/v1/models/tiny/adapters/1/audit.html", headers=auth(stack.keys.a))
    assert page.status_code == 200, page.text
    html = tmp_path / "audit.html"
    html.write_text(page.text)
    browser = ["chromium", "--headless", "--no-sandbox", "--disable-gpu"]
    dom = subprocess.run(
        [*browser, "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    assert re.search(r'class="verdict pass"><b>PASSED</b>', dom), dom[:2000]
    svgs = dom.count("<svg")
    assert svgs >= 8 and svgs == page.text.count("<svg")  # charts and histograms
    assert not re.search(r"<(script|link)\b|@import|url\(", dom)
    shot = tmp_path / "audit.png"
    subprocess.run(
        [*browser, f"--screenshot={shot}", "--window-size=1200,2400", html.as_uri()],
        capture_output=True,
        timeout=120,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_batch_continues_from_the_first_version(stack: Stack):
    stack.start_worker()
    first = stack.submit(FORGET, method=FAST_METHOD)
    assert stack.wait_status(first, {"completed", "failed"})["status"] == "completed", stack.logs()
    second = stack.submit(FORGET_B, method=FAST_METHOD)
    assert stack.wait_status(second, {"completed", "failed"})["status"] == "completed", stack.logs()

    items = stack.client.get("/v1/models/tiny/adapters", headers=auth(stack.keys.a)).json()["items"]
    assert [(v["version"], v["parent_version"]) for v in items] == [(1, None), (2, 1)]
    v2 = stack.client.get("/v1/models/tiny/adapters/2", headers=auth(stack.keys.a)).json()
    assert v2["covered_requests"] == [second]
    assert stack.request(second)["adapter_version"] == 2
    assert stack.request(first)["adapter_version"] == 1


def test_the_python_client_submits_waits_audits_and_downloads(stack: Stack, live_url, tmp_path):
    from service.client import ApiError, Client

    stack.start_worker()
    with Client(live_url, stack.keys.a) as client:
        key = "client-test-1"
        req = client.submit("tiny", "subject-9", FORGET, method=FAST_METHOD, idempotency_key=key)
        again = client.submit("tiny", "subject-9", FORGET, method=FAST_METHOD, idempotency_key=key)
        assert again["id"] == req["id"]  # a retried submit stores one request
        done = client.wait(req["id"], timeout=180, poll=0.5)
        assert done["status"] == "completed", stack.logs()
        assert client.request_audit(req["id"])["verdict"]["passed"] is True
        page = client.adapter_audit_html("tiny", done["adapter_version"])
        assert page.startswith("<!doctype html>") and "PASSED" in page
        folder = client.download("tiny", done["adapter_version"], tmp_path / "adapter")
        assert (folder / "adapter_model.safetensors").is_file()
        try:
            client.download("tiny", 99, tmp_path / "nope")
        except ApiError as exc:
            assert exc.status == 404 and "no adapter version" in exc.problem["detail"]
        else:
            raise AssertionError("a missing version must raise ApiError")

    # The same through the command line.
    from typer.testing import CliRunner

    from service.cli import app

    runner = CliRunner()
    opts = ["--url", live_url, "--key", stack.keys.a]
    res = runner.invoke(app, ["status", req["id"], *opts])
    assert res.exit_code == 0 and '"completed"' in res.output, res.output
    res = runner.invoke(app, ["audit", "--model", "tiny", "--version", "1", *opts])
    assert res.exit_code == 0 and "verdict: PASSED" in res.output, res.output
    res = runner.invoke(app, ["download", "tiny", "--out", str(tmp_path / "cli"), *opts])
    assert res.exit_code == 0 and "digests verified" in res.output, res.output
    res = runner.invoke(
        app, ["download", "tiny", "--version", "7", "--out", str(tmp_path / "x"), *opts]
    )
    assert res.exit_code == 1 and "404" in res.output


def test_requests_batched_into_one_job_are_each_held_to_the_stop_rule(
    stack: Stack, settings, tmp_path
):
    settings.batch_window_seconds = 60
    settings.batch_max_requests = 2  # the two requests below make one job
    stack.start_worker()
    first = stack.submit(FORGET, method=FAST_METHOD)
    second = stack.submit(FORGET_B, method=FAST_METHOD)
    for rid in (first, second):
        done = stack.wait_status(rid, {"completed", "failed"}, timeout=300)
        assert done["status"] == "completed" and done["adapter_version"] == 1, stack.logs()

    r = _download(stack, "1")
    assert r.status_code == 200, r.text
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        tar.extractall(tmp_path / "v1", filter="data")
    manifest = json.loads((tmp_path / "v1" / "manifest.json").read_text())
    assert sorted(manifest["covered_requests"]) == sorted([first, second])
    record = json.loads((tmp_path / "v1" / "record.json").read_text())
    # each request got a job of one's step budget and its own stop level
    assert record["batched_requests"] == 2
    assert record["method"]["max_steps"] == 2 * FAST_METHOD["max_steps"]
    assert len(record["outcome"]["group_thresholds"]) == 2
    assert all("forget_groups_left" in e for e in record["outcome"]["evals"])
    # TRAIN_DTYPE=auto: the engine's own pick for training on this CPU
    from workers.ml.loading import pick_placement

    auto = pick_placement("cpu", training=True).dtype
    assert record["environment"]["dtype"] == str(auto).removeprefix("torch.")
    # the job ran in a forked child of a worker started as `unlearn up` starts one
    from workers.allocator import jemalloc_library

    expected = "jemalloc" if jemalloc_library() else "glibc"
    assert record["environment"]["allocator"].startswith(expected)
