"""Database access for jobs: every query is scoped to the owning API key."""

from __future__ import annotations

from typing import Optional

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from ..models import Artifact, Job


def get(session: Session, job_id: str, owner_id: str) -> Optional[Job]:
    return session.scalar(select(Job).where(Job.id == job_id, Job.owner_id == owner_id))


def by_idempotency_key(session: Session, owner_id: str, key: str) -> Optional[Job]:
    return session.scalar(select(Job).where(Job.owner_id == owner_id, Job.idempotency_key == key))


def page(session: Session, owner_id: str, *, status: Optional[str], type_: Optional[str], limit: int,
         after: Optional[Job]) -> list[Job]:
    """Newest first; `after` is the last job of the previous page."""
    q = select(Job).where(Job.owner_id == owner_id)
    if status:
        q = q.where(Job.status == status)
    if type_:
        q = q.where(Job.type == type_)
    if after is not None:
        q = q.where(or_(Job.created_at < after.created_at,
                        and_(Job.created_at == after.created_at, Job.id < after.id)))
    return list(session.scalars(q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)))


def artifacts(session: Session, job_id: str) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))


def artifact(session: Session, job_id: str, name: str) -> Optional[Artifact]:
    return session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))


def finished_outputs(session: Session, owner_id: str, limit: int = 200) -> list[Job]:
    q = (select(Job).where(Job.owner_id == owner_id, Job.status == "succeeded",
                           Job.type.in_(("compress", "finetune")))
         .order_by(Job.created_at.desc()).limit(limit))
    return list(session.scalars(q))
