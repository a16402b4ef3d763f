"""Rows made through the service functions (not raw inserts), so tests exercise the
same code paths as the API."""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from service.access import service as access
from service.access.scopes import DEFAULT_CLIENT_SCOPES
from service.erasure_requests import service as requests_svc
from service.erasure_requests.models import ErasureRequest
from service.erasure_requests.schemas import ErasureRequestCreate
from service.models_registry import service as registry
from service.models_registry.schemas import ModelCreate


def principal(session: Session, tenant: str = "acme") -> access.Principal:
    minted = access.mint_key(session, tenant_name=tenant, scopes=DEFAULT_CLIENT_SCOPES, name="t")
    found = access.authenticate(session, minted.token)
    assert found is not None
    return found


def model(session: Session, name: str = "support") -> str:
    registry.register(session, spec=ModelCreate(name=name), actor="test")
    return name


def requests(
    session: Session,
    who: access.Principal,
    n: int,
    model_name: str = "support",
    method: dict | None = None,
) -> list[ErasureRequest]:
    out = []
    for i in range(n):
        body = ErasureRequestCreate.model_validate(
            {
                "model": model_name,
                "subject_ref": f"subject-{i}",
                "items": [{"prompt": f"Who is person {i}?", "completion": f"Person {i} secret"}],
                **({"method": method} if method else {}),
            }
        )
        filed = requests_svc.submit(
            session, principal=who, body=body, idempotency_key=uuid.uuid4().hex
        )
        # The intake answers with a copy outside the session; tests follow the live row.
        out.append(session.get_one(ErasureRequest, filed.request.id))
    return out
