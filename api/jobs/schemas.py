"""Request and response bodies of the jobs API."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from .params import CompressParams, EvaluateParams, FinetuneParams, model_name_field

ModelSpec = model_name_field(500, "a registry name, the id of an earlier job's output, a folder under the models "
                                  "directory, or a cached HF model id")


class CompressJobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["compress"]
    model: ModelSpec
    params: CompressParams


class FinetuneJobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["finetune"]
    model: ModelSpec
    params: FinetuneParams


class EvaluateJobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["evaluate"]
    model: ModelSpec
    params: EvaluateParams = EvaluateParams()


JobCreate = Annotated[Union[CompressJobCreate, FinetuneJobCreate, EvaluateJobCreate],
                      Field(discriminator="type")]


class JobError(BaseModel):
    code: str
    message: str


class JobOut(BaseModel):
    id: str
    type: str
    model: str
    params: dict[str, Any]
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    stage: Optional[str] = None
    progress: float = Field(ge=0, le=1)
    queue: str
    attempts: int
    cancel_requested: bool
    created_at: dt.datetime
    started_at: Optional[dt.datetime] = None
    finished_at: Optional[dt.datetime] = None
    error: Optional[JobError] = None
    result: Optional[dict[str, Any]] = Field(None, description="summary: achieved ERR, perplexity, ...")
    metrics: Optional[dict[str, Any]] = Field(None, description="latest metrics (final once finished)")


class JobList(BaseModel):
    data: list[JobOut]
    next_cursor: Optional[str] = Field(None, description="pass as `after` for the next page")


class Event(BaseModel):
    seq: int
    type: Literal["status", "progress", "metric", "log"]
    time: dt.datetime
    data: dict[str, Any]


class MetricPoint(BaseModel):
    seq: int
    time: dt.datetime
    stage: Optional[str] = None
    step: Optional[int] = None
    value: float


class Metrics(BaseModel):
    series: dict[str, list[MetricPoint]]
    final: Optional[dict[str, Any]] = None
    latest: Optional[dict[str, Any]] = None
