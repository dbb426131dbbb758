"""GET /v1/jobs/{id}/report (what the console's rank map and spectrum charts draw)."""

from __future__ import annotations

from typing import Any, Optional

from fastapi import APIRouter
from pydantic import BaseModel, Field

from ..errors import responses
from ..deps import CurrentKey, DbDep, JobId, SettingsDep
from ..jobs import service as jobs_service
from ..strictjson import StrictJsonRoute
from . import service

router = APIRouter(prefix="/v1/jobs", tags=["reports"], route_class=StrictJsonRoute)


class MatrixOut(BaseModel):
    name: str
    layer: Optional[int] = Field(None, description="decoder layer index")
    matrix: str = Field(description="matrix type: q_proj, k_proj, ..., down_proj")
    shape: Optional[list[int]] = None
    rank: int = Field(description="full rank min(m, n)")
    kept_rank: int
    kept_fraction: Optional[float] = Field(None, description="kept_rank / rank")
    label: Optional[str] = Field(None, description="LRC (factored) or N-LRC (dense, untouched)")
    storage: Optional[str] = Field(None, description="factors or dense")
    rel_error: Optional[float] = None
    spectrum_z: Optional[list[float]] = Field(None, description="normalised singular values z (descending) at "
                                                                "evenly spaced ranks, when the checkpoint has them")


class Report(BaseModel):
    job_id: str
    summary: dict[str, Any] = Field(description="tau, ERR and parameters requested/achieved, LRC/N-LRC counts")
    tau: Optional[float] = Field(None, description="the global threshold on z (None for the uniform method)")
    layers: list[int]
    matrix_types: list[str]
    matrices: list[MatrixOut]


@router.get("/{job_id}/report", response_model=Report,
            summary="Per-matrix report of a compress/finetune job: ranks, LRC/N-LRC, spectra, tau",
            responses=responses(401, 404, 409, 422))
def job_report(job_id: JobId, key: CurrentKey, db: DbDep, settings: SettingsDep) -> Report:
    with db() as s:
        job = jobs_service.get(s, job_id, key)
        return Report.model_validate(service.report(settings, s, job))
