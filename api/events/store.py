"""The durable copy of job events in the database, and the helpers that build events."""

from __future__ import annotations

import datetime as dt
from typing import Iterable

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..models import JobEvent, utcnow

EVENT_TYPES = ("status", "progress", "metric", "log")


def make_event(seq: int, type_: str, data: dict, time: dt.datetime | None = None) -> dict:
    return {"seq": seq, "type": type_, "time": (time or utcnow()).isoformat(), "data": data}


def to_event(row: JobEvent) -> dict:
    return make_event(row.seq, row.type, row.data, row.created_at)


def add_events(session: Session, job_id: str, events: Iterable[dict]) -> None:
    for e in events:
        session.add(JobEvent(job_id=job_id, seq=e["seq"], type=e["type"], data=e["data"],
                             created_at=dt.datetime.fromisoformat(e["time"])))


def max_seq(session: Session, job_id: str) -> int:
    value = session.scalar(select(func.max(JobEvent.seq)).where(JobEvent.job_id == job_id))
    return -1 if value is None else int(value)


def events_after(session: Session, job_id: str, after_seq: int = -1, types: tuple[str, ...] = ()) -> list[dict]:
    q = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > after_seq)
    if types:
        q = q.where(JobEvent.type.in_(types))
    return [to_event(r) for r in session.scalars(q.order_by(JobEvent.seq))]
