"""Tenants and API keys: minting, authenticating, revoking. Functions never commit."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from service.access.models import ApiKey, Tenant
from service.access.scopes import ALL_SCOPES, Scope
from service.db import utcnow
from service.trail import service as trail

KEY_PREFIX = "ulk"


@dataclass(frozen=True)
class Principal:
    key_id: str
    tenant_id: str
    scopes: frozenset[str]

    def has(self, scope: Scope | str) -> bool:
        return str(scope) in self.scopes or Scope.ADMIN.value in self.scopes

    @property
    def is_admin(self) -> bool:
        return Scope.ADMIN.value in self.scopes


@dataclass(frozen=True)
class MintedKey:
    key_id: str
    tenant_id: str
    tenant_name: str
    scopes: list[str]
    token: str  # shown once, never stored


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def get_or_create_tenant(session: Session, *, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def mint_key(
    session: Session, *, tenant_name: str, scopes: list[str], name: str, actor: str = "system"
) -> MintedKey:
    unknown = sorted(set(scopes) - set(ALL_SCOPES))
    if unknown:
        raise ValueError(f"unknown scopes {unknown}; known: {ALL_SCOPES}")
    if not scopes:
        raise ValueError("a key needs at least one scope")
    tenant = get_or_create_tenant(session, name=tenant_name)
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    session.add(
        ApiKey(
            id=key_id,
            tenant_id=tenant.id,
            name=name,
            secret_sha256=_digest(secret),
            scopes=sorted(set(scopes)),
        )
    )
    session.flush()
    trail.record(
        session,
        actor=actor,
        event_type="api_key.created",
        object_type="api_key",
        object_id=key_id,
        tenant_id=tenant.id,
        details={"scopes": sorted(set(scopes)), "tenant": tenant.id},
    )
    return MintedKey(
        key_id, tenant.id, tenant.name, sorted(set(scopes)), f"{KEY_PREFIX}_{key_id}_{secret}"
    )


# Every request authenticates: a prepared Core statement on the table's columns, because
# building a query and loading an ORM object each cost more than the query itself.
_keys = ApiKey.__table__.c
_LIVE_KEY = select(_keys.secret_sha256, _keys.tenant_id, _keys.scopes).where(
    _keys.id == bindparam("id"), _keys.revoked_at.is_(None)
)


def authenticate(session: Session, token: str) -> Principal | None:
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not re.fullmatch(r"[0-9a-f]{12}", parts[1]):
        return None
    key = session.execute(_LIVE_KEY, {"id": parts[1]}).first()
    if key is None or not hmac.compare_digest(key.secret_sha256, _digest(parts[2])):
        return None
    return Principal(key_id=parts[1], tenant_id=key.tenant_id, scopes=frozenset(key.scopes))


def revoke_key(session: Session, *, key_id: str, actor: str = "system") -> bool:
    key = session.get(ApiKey, key_id)
    if key is None or key.revoked_at is not None:
        return False
    key.revoked_at = utcnow()
    trail.record(
        session,
        actor=actor,
        event_type="api_key.revoked",
        object_type="api_key",
        object_id=key_id,
        tenant_id=key.tenant_id,
        details={},
    )
    return True


def any_admin_key(session: Session) -> bool:
    keys = session.scalars(select(ApiKey).where(ApiKey.revoked_at.is_(None))).all()
    return any(Scope.ADMIN.value in k.scopes for k in keys)
