"""Imports every ORM module so Base.metadata knows all tables (Alembic, tests)."""

from service.access.models import ApiKey, Tenant
from service.adapters.models import AdapterVersion
from service.db import Base
from service.erasure_requests.models import ErasureRequest
from service.jobs.models import Job
from service.models_registry.models import RegisteredModel
from service.trail.models import AuditEvent

__all__ = [
    "AdapterVersion",
    "ApiKey",
    "AuditEvent",
    "Base",
    "ErasureRequest",
    "Job",
    "RegisteredModel",
    "Tenant",
]
