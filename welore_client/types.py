"""Typed responses of the API (pydantic). Unknown fields are kept (`extra="allow"`), so a newer
server never breaks an older client."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict

TERMINAL = ("succeeded", "failed", "cancelled")


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class JobError(_Model):
    code: str
    message: str


class Job(_Model):
    id: str
    type: str
    model: str
    params: dict[str, Any] = {}
    status: str
    stage: Optional[str] = None
    progress: float = 0.0
    queue: Optional[str] = None
    attempts: int = 0
    cancel_requested: bool = False
    created_at: dt.datetime
    started_at: Optional[dt.datetime] = None
    finished_at: Optional[dt.datetime] = None
    error: Optional[JobError] = None
    result: Optional[dict[str, Any]] = None
    metrics: Optional[dict[str, Any]] = None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


class Event(_Model):
    seq: int
    type: str  # status | progress | metric | log
    time: dt.datetime
    data: dict[str, Any] = {}

    @property
    def is_terminal(self) -> bool:
        return self.type == "status" and self.data.get("status") in TERMINAL


class MetricPoint(_Model):
    seq: int
    time: dt.datetime
    stage: Optional[str] = None
    step: Optional[int] = None
    value: float


class Metrics(_Model):
    series: dict[str, list[MetricPoint]] = {}
    final: Optional[dict[str, Any]] = None
    latest: Optional[dict[str, Any]] = None


class Artifact(_Model):
    name: str
    size: int
    sha256: str
    url: str


class File(_Model):
    id: str
    filename: str
    format: str
    size: int
    sha256: str
    records: int
    created_at: dt.datetime


class Model(_Model):
    id: str
    source: str  # registry | models_dir | job
    available: bool = True


class Dataset(_Model):
    id: str
    source: str  # builtin | upload


class Downloaded(_Model):
    """One file written by `jobs.download`: `resumed_from` > 0 when a partial file was continued,
    `skipped` when an identical file was already there."""

    name: str
    path: Path
    size: int
    sha256: str
    resumed_from: int = 0
    skipped: bool = False
