from __future__ import annotations

from enum import StrEnum


class Scope(StrEnum):
    REQUESTS_WRITE = "requests:write"
    REQUESTS_READ = "requests:read"
    AUDIT_READ = "audit:read"
    ADAPTERS_DOWNLOAD = "adapters:download"
    ADMIN = "admin"


ALL_SCOPES = [s.value for s in Scope]
# What a privacy team's integration usually needs; admin is never implied.
DEFAULT_CLIENT_SCOPES = [
    Scope.REQUESTS_WRITE.value,
    Scope.REQUESTS_READ.value,
    Scope.AUDIT_READ.value,
    Scope.ADAPTERS_DOWNLOAD.value,
]
