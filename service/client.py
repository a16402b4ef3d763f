"""A small Python client of the service (httpx): submit with an idempotency key, wait
with a progress bar, fetch the audit, download an adapter and verify its digests.

    from service.client import Client
    with Client("http://127.0.0.1:8000", api_key) as c:
        req = c.submit("support-bot", "crm-4711", [{"prompt": "...", "completion": "..."}])
        done = c.wait(req["id"], progress=True)
        folder = c.download("support-bot", done["adapter_version"], "adapter-v1")
"""

from __future__ import annotations

import base64
import hashlib
import json
import tarfile
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

FINAL = {"completed", "failed", "canceled", "rejected"}


class ApiError(Exception):
    """An RFC 9457 problem from the service (or a transport failure)."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status, self.problem = status, problem
        super().__init__(f"{status} {problem.get('title', '')}: {problem.get('detail', '')}")


class DigestMismatch(Exception):
    pass


class Client:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout,
            transport=transport,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _json(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = {"title": response.reason_phrase, "detail": response.text[:500]}
            raise ApiError(response.status_code, problem)
        return response.json()

    # ---- models ---------------------------------------------------------------------

    def register_model(
        self, name: str, source: str, retain: list[dict[str, str]], **extra: Any
    ) -> Any:
        return self._json(
            self.http.post(
                "/v1/models", json={"name": name, "source": source, "retain": retain, **extra}
            )
        )

    def model(self, name: str) -> Any:
        return self._json(self.http.get(f"/v1/models/{name}"))

    # ---- requests -------------------------------------------------------------------

    def submit(
        self,
        model: str,
        subject_ref: str,
        items: list[dict[str, str]],
        *,
        holdout: list[dict[str, str]] | None = None,
        method: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        attempts: int = 5,
    ) -> Any:
        """Submit once, safely: the same Idempotency-Key is reused on every retry of a
        lost connection or a 409 "key being written", so the service stores one request."""
        key = idempotency_key or str(uuid.uuid4())
        body: dict[str, Any] = {"model": model, "subject_ref": subject_ref, "items": items}
        if holdout:
            body["holdout"] = holdout
        if method:
            body["method"] = method
        for attempt in range(attempts):
            try:
                r = self.http.post(
                    "/v1/erasure-requests", json=body, headers={"Idempotency-Key": key}
                )
            except httpx.TransportError:
                if attempt == attempts - 1:
                    raise
                time.sleep(2**attempt)
                continue
            if r.status_code == 409 and r.headers.get("retry-after") and attempt < attempts - 1:
                time.sleep(float(r.headers["retry-after"]))
                continue
            return self._json(r)
        raise RuntimeError("unreachable")

    def request(self, request_id: str) -> Any:
        return self._json(self.http.get(f"/v1/erasure-requests/{request_id}"))

    def job(self, job_id: str) -> Any:
        return self._json(self.http.get(f"/v1/jobs/{job_id}"))

    def cancel(self, request_id: str) -> Any:
        return self._json(self.http.post(f"/v1/erasure-requests/{request_id}/cancel"))

    def wait(
        self,
        request_id: str,
        *,
        timeout: float | None = None,
        poll: float = 2.0,
        progress: bool = False,
    ) -> Any:
        """Poll until the request is completed, failed, canceled or rejected; with
        `progress`, a rich progress bar follows the job's stage and progress."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _Bar() if progress else None
        try:
            while True:
                req = self.request(request_id)
                if bar is not None:
                    job = self.job(req["job_id"]) if req.get("job_id") else None
                    bar.update(req["status"], job)
                if req["status"] in FINAL:
                    return req
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(
                        f"request {request_id} still {req['status']} after {timeout} s"
                    )
                time.sleep(poll)
        finally:
            if bar is not None:
                bar.close()

    # ---- audit and adapters ---------------------------------------------------------

    def request_audit(self, request_id: str) -> Any:
        return self._json(self.http.get(f"/v1/erasure-requests/{request_id}/audit"))

    def adapter(self, model: str, version: int | str = "latest") -> Any:
        return self._json(self.http.get(f"/v1/models/{model}/adapters/{version}"))

    def adapter_audit(self, model: str, version: int | str = "latest") -> Any:
        return self._json(self.http.get(f"/v1/models/{model}/adapters/{version}/audit"))

    def adapter_audit_html(self, model: str, version: int | str = "latest") -> str:
        """The audit report page for people (self-contained HTML)."""
        r = self.http.get(f"/v1/models/{model}/adapters/{version}/audit.html")
        if r.status_code >= 400:
            self._json(r)
        return r.text

    def download(self, model: str, version: int | str, dest: str | Path) -> Path:
        """Download an adapter, check the archive against its ETag and Repr-Digest and
        every file against the manifest, and extract it into `dest` (a folder PEFT
        loads). Raises DigestMismatch if anything differs."""
        dest = Path(dest)
        h = hashlib.sha256()
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / "adapter.tar.gz"
            with self.http.stream("GET", f"/v1/models/{model}/adapters/{version}/download") as r:
                if r.status_code >= 400:
                    r.read()
                    self._json(r)
                with archive.open("wb") as f:
                    for chunk in r.iter_bytes():
                        h.update(chunk)
                        f.write(chunk)
                etag = r.headers.get("etag", "").strip('"')
                repr_digest = r.headers.get("repr-digest", "")
            digest = h.hexdigest()
            expected = base64.b64encode(bytes.fromhex(digest)).decode()
            if digest != etag or repr_digest != f"sha-256=:{expected}:":
                raise DigestMismatch(f"archive sha256 {digest} does not match ETag {etag}")
            dest.mkdir(parents=True, exist_ok=True)
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(dest, filter="data")
        manifest = json.loads((dest / "manifest.json").read_text())
        for name, want in manifest["files"].items():
            got = hashlib.sha256((dest / name).read_bytes()).hexdigest()
            if got != want:
                raise DigestMismatch(f"{name}: sha256 {got}, manifest says {want}")
        return dest


class _Bar:
    """A rich progress bar over the job's progress, labelled with the request status."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description:<24}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
        )
        self.task = self.progress.add_task("received", total=1.0)
        self.progress.start()

    def update(self, status: str, job: dict[str, Any] | None) -> None:
        label = f"{status} ({job['stage']})" if job else status
        done = 1.0 if status == "completed" else (job or {}).get("progress", 0.0)
        self.progress.update(self.task, description=label, completed=done)

    def close(self) -> None:
        self.progress.stop()
