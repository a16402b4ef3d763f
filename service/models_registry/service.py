"""Registering and finding base models. Functions never commit."""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.config import get_settings
from service.errors import Problem, not_found
from service.models_registry.models import RegisteredModel
from service.models_registry.schemas import MODEL_NAME_PATTERN, ModelCreate
from service.trail import service as trail
from workers.ml.specs import BUILTIN_MODELS


def _check_source(source: str) -> None:
    if source.startswith("builtin:"):
        if source not in BUILTIN_MODELS:
            raise Problem(
                422,
                "unknown-builtin-model",
                "Unknown built-in model",
                f"source {source!r} is not a built-in model; known: {sorted(BUILTIN_MODELS)}",
            )
        return
    path = Path(source)
    if not path.is_absolute() or not (path / "config.json").is_file():
        raise Problem(
            422,
            "invalid-model-source",
            "Invalid model source",
            f"source {source!r} must be a built-in name ({sorted(BUILTIN_MODELS)}) or an "
            "absolute path to a Hugging Face model folder containing config.json",
        )


def register(session: Session, *, spec: ModelCreate, actor: str) -> RegisteredModel:
    limit = get_settings().max_retain_items
    if len(spec.retain) > limit:
        raise Problem(
            422,
            "too-many-retain-items",
            "Too many retain items",
            f"retain has {len(spec.retain)} items; the limit is {limit} (MAX_RETAIN_ITEMS)",
        )
    _check_source(spec.source)
    if session.scalar(select(RegisteredModel.id).where(RegisteredModel.name == spec.name)):
        raise Problem(
            409,
            "model-exists",
            "Model already registered",
            f"a model named {spec.name!r} exists; models are immutable, register a new name",
        )
    model = RegisteredModel(
        name=spec.name,
        source=spec.source,
        retain_items=[item.plain() for item in spec.retain],
        default_method=spec.default_method.model_dump() if spec.default_method else None,
        audit_policy=spec.audit_policy.model_dump() if spec.audit_policy else None,
    )
    session.add(model)
    try:
        session.flush()
    except IntegrityError as exc:  # a concurrent registration of the same name
        raise Problem(
            409, "model-exists", "Model already registered", f"a model named {spec.name!r} exists"
        ) from exc
    trail.record(
        session,
        actor=actor,
        event_type="model.registered",
        object_type="model",
        object_id=model.id,
        details={
            "name": model.name,
            "source": model.source,
            "retain_count": len(model.retain_items),
        },
    )
    return model


def is_model_name(name: str) -> bool:
    """Whether `name` can be a model's name: anything else (a NUL byte, say) is simply
    not found, without reaching the database."""
    return re.fullmatch(MODEL_NAME_PATTERN, name) is not None


def get_by_name(session: Session, name: str) -> RegisteredModel:
    model = (
        session.scalar(select(RegisteredModel).where(RegisteredModel.name == name))
        if is_model_name(name)
        else None
    )
    if model is None:
        raise not_found("model", name)
    return model


def list_models(session: Session) -> list[RegisteredModel]:
    return list(session.scalars(select(RegisteredModel).order_by(RegisteredModel.name)))
