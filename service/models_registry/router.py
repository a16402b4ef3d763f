from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response, status

from service.access.scopes import Scope
from service.access.service import Principal
from service.deps import PrincipalDep, SessionDep, require, require_json
from service.models_registry import service
from service.models_registry.models import RegisteredModel
from service.models_registry.schemas import ModelCreate, ModelList, ModelOut
from workers.audit.policy import AuditPolicy

router = APIRouter(prefix="/v1/models", tags=["models"])


def to_out(model: RegisteredModel) -> ModelOut:
    return ModelOut(
        name=model.name,
        source=model.source,
        retain_count=len(model.retain_items),
        default_method=model.default_method,
        audit_policy=AuditPolicy.model_validate(model.audit_policy or {}).model_dump(),
        created_at=model.created_at,
        links={"self": f"/v1/models/{model.name}"},
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ModelOut,
    dependencies=[Depends(require_json)],
    summary="Register a base model (admin)",
)
def register_model(
    body: ModelCreate,
    session: SessionDep,
    response: Response,
    principal: Annotated[Principal, Depends(require(Scope.ADMIN))],
) -> ModelOut:
    model = service.register(session, spec=body, actor=principal.key_id)
    session.commit()
    response.headers["Location"] = f"/v1/models/{model.name}"
    return to_out(model)


@router.get("", response_model=ModelList, summary="List registered models")
def list_models(session: SessionDep, _: PrincipalDep) -> ModelList:
    return ModelList(items=[to_out(m) for m in service.list_models(session)])


@router.get("/{name}", response_model=ModelOut, summary="One registered model")
def get_model(name: str, session: SessionDep, _: PrincipalDep) -> ModelOut:
    return to_out(service.get_by_name(session, name))
