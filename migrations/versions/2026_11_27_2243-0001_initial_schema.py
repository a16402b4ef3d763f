"""initial schema: tenants, keys, models, requests, jobs, trail

Revision ID: 0001
Revises:
Create Date: 2026-11-27 22:43:58.463787
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import service.db

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("occurred_at", service.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=True),
        sa.Column("event_type", sa.String(length=64), nullable=False),
        sa.Column("object_type", sa.String(length=32), nullable=False),
        sa.Column("object_id", sa.String(length=64), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("payload_digest", sa.String(length=64), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_events")),
        sa.UniqueConstraint("hash", name=op.f("uq_audit_events_hash")),
        sa.UniqueConstraint("prev_hash", name=op.f("uq_audit_events_prev_hash")),
    )
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_events_object_id"), ["object_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_events_tenant_id"), ["tenant_id"], unique=False)

    op.create_table(
        "models",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("source", sa.String(length=1000), nullable=False),
        sa.Column("retain_items", sa.JSON(), nullable=False),
        sa.Column("default_method", sa.JSON(), nullable=True),
        sa.Column("created_at", service.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("name", name=op.f("uq_models_name")),
    )
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("created_at", service.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenants")),
        sa.UniqueConstraint("name", name=op.f("uq_tenants_name")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=16), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("secret_sha256", sa.String(length=64), nullable=False),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("created_at", service.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", service.db.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_api_keys_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_keys_tenant_id"), ["tenant_id"], unique=False)

    op.create_table(
        "jobs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("model_id", sa.String(length=36), nullable=False),
        sa.Column("method", sa.JSON(), nullable=True),
        sa.Column("stage", sa.String(length=16), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(length=200), nullable=True),
        sa.Column("error", sa.String(length=2000), nullable=True),
        sa.Column("created_at", service.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("enqueued_at", service.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("started_at", service.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", service.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("finished_at", service.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("updated_at", service.db.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "stage IN ('queued', 'preparing', 'training', 'evaluating', 'packaging', 'succeeded', 'failed', 'canceled')",
            name=op.f("ck_jobs_stage_known"),
        ),
        sa.CheckConstraint("progress >= 0 AND progress <= 1", name=op.f("ck_jobs_progress_range")),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_jobs_model_id_models")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_jobs_model_id"), ["model_id"], unique=False)
        batch_op.create_index("ix_jobs_stage_heartbeat", ["stage", "heartbeat_at"], unique=False)

    op.create_table(
        "erasure_requests",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("model_id", sa.String(length=36), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("status_reason", sa.String(length=1000), nullable=True),
        sa.Column("idempotency_key", sa.String(length=255), nullable=False),
        sa.Column("body_hmac", sa.String(length=64), nullable=False),
        sa.Column("subject_ref_hmac", sa.String(length=64), nullable=False),
        sa.Column("subject_ref_ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("items_ciphertext", sa.LargeBinary(), nullable=True),
        sa.Column("holdout_ciphertext", sa.LargeBinary(), nullable=True),
        sa.Column("item_kind", sa.String(length=8), nullable=False),
        sa.Column("item_count", sa.Integer(), nullable=False),
        sa.Column("holdout_count", sa.Integer(), nullable=False),
        sa.Column("item_salt", sa.String(length=32), nullable=False),
        sa.Column("item_hashes", sa.JSON(), nullable=False),
        sa.Column("holdout_hashes", sa.JSON(), nullable=False),
        sa.Column("method_override", sa.JSON(), nullable=True),
        sa.Column("method_key", sa.String(length=64), nullable=False),
        sa.Column("received_at", service.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("due_at", service.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("queued_at", service.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("started_at", service.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("finished_at", service.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("job_id", sa.String(length=36), nullable=True),
        sa.Column("adapter_version", sa.Integer(), nullable=True),
        sa.Column("data_purged_at", service.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("updated_at", service.db.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('received', 'queued', 'running', 'evaluating', 'completed', 'failed', 'canceled', 'rejected')",
            name=op.f("ck_erasure_requests_status_known"),
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_erasure_requests_job_id_jobs")
        ),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name=op.f("fk_erasure_requests_model_id_models")
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_erasure_requests_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_erasure_requests")),
    )
    with op.batch_alter_table("erasure_requests", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_erasure_requests_job_id"), ["job_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_erasure_requests_model_id"), ["model_id"], unique=False
        )
        batch_op.create_index(
            "ix_erasure_requests_status_received", ["status", "received_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_erasure_requests_subject_ref_hmac"), ["subject_ref_hmac"], unique=False
        )
        batch_op.create_index(
            "ix_erasure_requests_tenant_received", ["tenant_id", "received_at", "id"], unique=False
        )
        batch_op.create_index(
            "uq_erasure_requests_tenant_idempotency", ["tenant_id", "idempotency_key"], unique=True
        )


def downgrade() -> None:
    with op.batch_alter_table("erasure_requests", schema=None) as batch_op:
        batch_op.drop_index("uq_erasure_requests_tenant_idempotency")
        batch_op.drop_index("ix_erasure_requests_tenant_received")
        batch_op.drop_index(batch_op.f("ix_erasure_requests_subject_ref_hmac"))
        batch_op.drop_index("ix_erasure_requests_status_received")
        batch_op.drop_index(batch_op.f("ix_erasure_requests_model_id"))
        batch_op.drop_index(batch_op.f("ix_erasure_requests_job_id"))

    op.drop_table("erasure_requests")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_stage_heartbeat")
        batch_op.drop_index(batch_op.f("ix_jobs_model_id"))

    op.drop_table("jobs")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_tenant_id"))

    op.drop_table("api_keys")
    op.drop_table("tenants")
    op.drop_table("models")
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_events_tenant_id"))
        batch_op.drop_index(batch_op.f("ix_audit_events_object_id"))

    op.drop_table("audit_events")
