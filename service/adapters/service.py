"""Adapter versions: publishing one (the worker, in one transaction), reading them (API).

Publishing, in the caller's transaction:
1. lock the model row (PostgreSQL FOR UPDATE; SQLite: the write lock every transaction
   takes), so concurrent publishes for one model are serialised and numbering is
   gap-free: version = last + 1;
2. write manifest and archive next to the staged adapter files, put every file into the
   store under `adapters/<model id>/v<version>/` (atomic puts; a version's objects are
   only reachable once its row commits, so a crash before commit leaves objects that the
   next publisher of that number overwrites);
3. insert the row, move the job and its requests to their final state, write the trail.
Idempotent: a job that already has a version gets that version back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.adapters import archive
from service.adapters.models import PUBLISHED, QUARANTINED, AdapterVersion
from service.adapters.store import ArtifactStore
from service.db import is_postgres, utcnow
from service.errors import Problem, not_found
from service.jobs import service as jobs
from service.jobs.models import Job
from service.models_registry.models import RegisteredModel
from service.states import JobStage
from service.trail import service as trail

MANIFEST_FORMAT = "unlearn-adapter-manifest/1"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ARCHIVE = "adapter.tar.gz"


@dataclass
class Staged:
    """What a worker hands over: a folder with the PEFT files, the engine record and the
    audit (with its verdict)."""

    folder: Path
    record: dict[str, Any]
    audit: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.audit["verdict"]["passed"])


class StaleParent(Exception):
    """A newer passing version appeared while the job trained from an older one."""


def latest_passing(session: Session, model_id: str) -> int | None:
    return session.scalar(
        select(func.max(AdapterVersion.version)).where(
            AdapterVersion.model_id == model_id, AdapterVersion.status == PUBLISHED
        )
    )


def for_job(session: Session, job_id: str) -> AdapterVersion | None:
    return session.scalar(select(AdapterVersion).where(AdapterVersion.job_id == job_id))


def metrics_summary(audit: dict[str, Any]) -> dict[str, Any]:
    return dict(audit.get("summary", {}))


def manifest_of(row: AdapterVersion, model: RegisteredModel) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "model": model.name,
        "version": row.version,
        "parent_version": row.parent_version,
        "status": row.status,
        "base_model": {"source": model.source, "digest": row.base_model_digest},
        "covered_requests": row.covered_requests,
        "method": row.method,
        "files": row.files,
        "metrics": metrics_summary(row.audit),
        "verdict": row.verdict,
        "job_id": row.job_id,
        "created_at": row.created_at.isoformat().replace("+00:00", "Z"),
    }


def publish(
    session: Session,
    *,
    job: Job,
    staged: Staged,
    store: ArtifactStore,
    actor: str,
) -> AdapterVersion:
    model_q = select(RegisteredModel).where(RegisteredModel.id == job.model_id)
    model = session.scalar(model_q.with_for_update() if is_postgres(session) else model_q)
    if model is None:
        raise LookupError(f"model {job.model_id} of job {job.id} is gone")
    existing = for_job(session, job.id)
    if existing is not None:
        return existing
    newest = latest_passing(session, model.id)
    if newest != job.parent_version:
        raise StaleParent(
            f"job {job.id} trained from version {job.parent_version} but the model's "
            f"latest passing version is now {newest}"
        )
    last = session.scalar(
        select(func.max(AdapterVersion.version)).where(AdapterVersion.model_id == model.id)
    )
    version = (last or 0) + 1
    covered = [r.id for r in jobs.live_requests(session, job.id)]

    folder = staged.folder
    (folder / "record.json").write_text(json.dumps(staged.record, indent=2, default=str))
    (folder / "audit.json").write_text(json.dumps(staged.audit, indent=2, default=str))
    files = {
        name: archive.sha256_file(folder / name)
        for name in (*ADAPTER_FILES, "audit.json", "record.json")
    }
    now = utcnow()
    row = AdapterVersion(
        model_id=model.id,
        version=version,
        parent_version=job.parent_version,
        job_id=job.id,
        status=PUBLISHED if staged.passed else QUARANTINED,
        verdict=staged.audit["verdict"],
        covered_requests=covered,
        method=staged.record["method"],
        base_model_digest=staged.record["base_model"]["digest"],
        files=files,
        storage_prefix=f"adapters/{model.id}/v{version}",
        archive_sha256="",
        archive_bytes=0,
        record=staged.record,
        audit=staged.audit,
        created_at=now,
    )
    (folder / "manifest.json").write_text(json.dumps(manifest_of(row, model), indent=2))
    archive.build(folder, folder / ARCHIVE, mtime=int(now.timestamp()))
    row.archive_sha256 = archive.sha256_file(folder / ARCHIVE)
    row.archive_bytes = (folder / ARCHIVE).stat().st_size
    for name in (*files, "manifest.json", ARCHIVE):
        store.put_file(f"{row.storage_prefix}/{name}", folder / name)

    session.add(row)
    session.flush()
    trail.record(
        session,
        actor=actor,
        event_type=f"adapter.{row.status}",
        object_type="adapter_version",
        object_id=row.id,
        details={
            "model": model.name,
            "version": version,
            "parent_version": row.parent_version,
            "job_id": job.id,
            "archive_sha256": row.archive_sha256,
            "covered_requests": covered,
            "failed_criteria": [c["name"] for c in row.verdict.get("failed", [])],
        },
    )
    if staged.passed:
        jobs.advance(session, job, JobStage.SUCCEEDED, actor=actor, adapter_version=version)
    else:
        failed = "; ".join(c["message"] for c in row.verdict.get("failed", []))
        jobs.advance(
            session,
            job,
            JobStage.FAILED,
            actor=actor,
            reason=f"the adapter failed its audit and is quarantined as version {version}: "
            f"{failed}",
        )
    return row


# ---- reading -------------------------------------------------------------------------


def list_versions(session: Session, model: RegisteredModel) -> list[AdapterVersion]:
    return list(
        session.scalars(
            select(AdapterVersion)
            .where(AdapterVersion.model_id == model.id)
            .order_by(AdapterVersion.version)
        )
    )


def get_version(session: Session, model: RegisteredModel, version: str) -> AdapterVersion:
    """`version` is a number or `latest` (the newest version that passed its audit)."""
    if version == "latest":
        number = latest_passing(session, model.id)
        if number is None:
            raise Problem(
                404,
                "no-passing-adapter",
                "No downloadable adapter yet",
                f"model '{model.name}' has no adapter version that passed its audit yet; "
                "poll its erasure requests until one is completed",
            )
    elif version.isdigit() and 0 < int(version) < 2**31:
        number = int(version)
    else:
        raise Problem(
            422,
            "bad-version",
            "Bad adapter version",
            f"'{version}' is not an adapter version: use a positive integer or 'latest'",
        )
    row = session.scalar(
        select(AdapterVersion).where(
            AdapterVersion.model_id == model.id, AdapterVersion.version == number
        )
    )
    if row is None:
        raise not_found("adapter version", f"{model.name} v{number}")
    return row
