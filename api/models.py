"""Database tables (SQLAlchemy 2 declarative). The schema changes only through Alembic
migrations (migrations/versions); these classes must match the latest one."""

from __future__ import annotations

import datetime as dt
import enum
import secrets
from typing import Any, Optional

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy import TypeDecorator, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

class JobStatus(str, enum.Enum):
    """The one list of job statuses; every transition between them is in api/jobs/states.py."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


TERMINAL = (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value)
STATUSES = tuple(s.value for s in JobStatus)
JOB_TYPES = ("compress", "finetune", "evaluate")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # what an id in a path or query may look like (new_id's among them)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc) if value is not None else None

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {dt.datetime: UTCDateTime, dict[str, Any]: JSON}


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[Optional[dt.datetime]] = mapped_column(default=None)


class File(Base):
    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(16))  # jsonl | txt
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    records: Mapped[int] = mapped_column(Integer)  # JSONL lines with text, or 1 for a .txt
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner_id", "idempotency_key", name="uq_jobs_owner_idempotency"),
        Index("ix_jobs_owner_created", "owner_id", "created_at", "id"),
    )
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    type: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(Text)  # as the user named it
    model_ref: Mapped[dict[str, Any]] = mapped_column(JSON)  # {"kind", "name"}: what the worker loads
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    stage: Mapped[Optional[str]] = mapped_column(String(64), default=None)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    queue: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[Optional[dt.datetime]] = mapped_column(default=None)
    finished_at: Mapped[Optional[dt.datetime]] = mapped_column(default=None)
    heartbeat_at: Mapped[Optional[dt.datetime]] = mapped_column(default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    runner: Mapped[Optional[str]] = mapped_column(String(100), default=None)  # who holds the claim
    # queued, its task message not sent yet (since when); the reaper re-sends what stays so
    undispatched_since: Mapped[Optional[dt.datetime]] = mapped_column(default=None)
    error_code: Mapped[Optional[str]] = mapped_column(String(64), default=None)
    error_message: Mapped[Optional[str]] = mapped_column(Text, default=None)
    result: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON, default=None)
    metrics: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON, default=None)  # latest/final
    idempotency_key: Mapped[Optional[str]] = mapped_column(String(255), default=None)
    request_hash: Mapped[Optional[str]] = mapped_column(String(64), default=None)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_job_events_seq"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(16))  # status | progress | metric | log
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_artifacts_name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))


class ReaperWatch(Base):
    """One row: when a reaper last read the database, and since when the reapers have read it with
    no gap longer than half the heartbeat timeout. A running job's silence counts only while they
    were watching, so a database outage is not mistaken for lost workers (api/jobs/reaper.py)."""

    __tablename__ = "reaper_watch"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    last_pass_at: Mapped[dt.datetime] = mapped_column()
    watching_since: Mapped[dt.datetime] = mapped_column()
