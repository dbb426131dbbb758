"""GET /v1/models: registry models, models-directory folders and the caller's finished outputs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from ..deps import CurrentKey, DbDep, SettingsDep
from ..errors import responses
from . import service

router = APIRouter(prefix="/v1/models", tags=["models"])


class ModelList(BaseModel):
    data: list[dict[str, Any]]


@router.get("", response_model=ModelList, summary="Models usable as job inputs", responses=responses(401))
def list_models(key: CurrentKey, db: DbDep, settings: SettingsDep) -> ModelList:
    with db() as s:
        return ModelList(data=service.list_models(s, settings, key))
