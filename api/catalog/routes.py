"""GET /v1/models (registry models, models-directory folders, the caller's finished outputs) and
GET /v1/datasets (built-in dataset names and the caller's uploads): what a job may name."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from ..deps import CurrentKey, DbDep, SettingsDep
from ..errors import responses
from ..files import service as files_service
from ..jobs.service import BUILTIN, EXTRA_BUILTIN, PACKAGED
from ..strictjson import StrictJsonRoute
from . import service

router = APIRouter(prefix="/v1/models", tags=["models"], route_class=StrictJsonRoute)
datasets_router = APIRouter(prefix="/v1/datasets", tags=["files"], route_class=StrictJsonRoute)


class ModelList(BaseModel):
    data: list[dict[str, Any]]


@router.get("", response_model=ModelList, summary="Models usable as job inputs", responses=responses(401))
def list_models(key: CurrentKey, db: DbDep, settings: SettingsDep) -> ModelList:
    with db() as s:
        return ModelList(data=service.list_models(s, settings, key))


class DatasetList(BaseModel):
    data: list[dict[str, Any]]


@datasets_router.get("", response_model=DatasetList, responses=responses(401),
                     summary="Datasets a job's `data` or `calibration` may name: built-in names and your uploads")
def list_datasets(key: CurrentKey, db: DbDep) -> DatasetList:
    out: list[dict[str, Any]] = [{"id": name, "source": "builtin"} for name in sorted({*BUILTIN, *PACKAGED, *EXTRA_BUILTIN})]
    with db() as s:
        out += [{"id": f.id, "source": "upload", "filename": f.filename, "format": f.format, "records": f.records,
                 "size": f.size} for f in files_service.list_files(s, key)]
    return DatasetList(data=out)
