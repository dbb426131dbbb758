"""Jobs business logic: submit (validate, persist, commit, then enqueue), read, list, cancel.

A job is enqueued only after its row is committed; a failed enqueue marks the job failed at
once rather than leaving it queued forever.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Optional

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from welore_core.compression.config import NO_CALIBRATION
from welore_core.corpus import BUILTIN, PACKAGED

from ..catalog.service import resolve_model
from ..errors import Conflict, InvalidRequest, NotFound, ServiceUnavailable
from ..events import store
from ..files import service as files_service
from ..models import ApiKey, Job, new_id, utcnow
from ..settings import Settings
from . import repository as repo
from .params import DATA_PARAMS, MODEL_PARAMS
from .schemas import JobError, JobOut

log = logging.getLogger("welore.api.jobs")

QUEUE_KIND = {"compress": "gpu", "finetune": "gpu", "evaluate": "gpu"}
# Built-in dataset names the engine knows beyond welore_core.corpus.BUILTIN.
EXTRA_BUILTIN = ("boolq-passages",)


def request_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _check_data(session: Session, owner: ApiKey, field: str, value: str) -> None:
    if value.startswith("file_"):
        files_service.get(session, value, owner)  # 404 when unknown or someone else's
        return
    names = sorted({*BUILTIN, *PACKAGED, *EXTRA_BUILTIN})
    if field == "calibration" and value.lower() == NO_CALIBRATION:
        return
    if value not in names:
        raise InvalidRequest(f"params.{field}: {value!r} is neither an uploaded file id (file_...) nor a "
                             f"built-in dataset", code="invalid_params",
                             fields=[{"field": f"params.{field}", "message": "unknown dataset",
                                      "allowed": "a file id from POST /v1/files or one of " + ", ".join(names),
                                      "received": value}])


def to_out(job: Job, bus=None) -> JobOut:
    metrics = job.metrics
    stage, progress = job.stage, job.progress
    if job.status == "running" and bus is not None:
        try:
            latest = bus.latest(job.id)
        except Exception:
            latest = None
        if latest:
            stage = latest.get("stage") or stage
            progress = max(progress, float(latest.get("progress") or 0.0))
            metrics = latest.get("metrics") or metrics
    return JobOut(id=job.id, type=job.type, model=job.model, params=job.params, status=job.status,
                  stage=stage, progress=min(max(progress, 0.0), 1.0), queue=job.queue, attempts=job.attempts,
                  cancel_requested=job.cancel_requested, created_at=job.created_at,
                  started_at=job.started_at, finished_at=job.finished_at,
                  error=JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None,
                  result=job.result, metrics=metrics)


def submit(session: Session, settings: Settings, dispatcher, bus, owner: ApiKey, body: dict,
           idempotency_key: Optional[str]) -> tuple[Job, bool]:
    """→ (job, created). `body` is the validated request as JSON-able data."""
    digest = request_hash(body)
    if idempotency_key:
        existing = repo.by_idempotency_key(session, owner.id, idempotency_key)
        if existing is not None:
            if existing.request_hash != digest:
                raise Conflict("this Idempotency-Key was used with a different request; use a new key",
                               code="idempotency_conflict")
            return existing, False
    params = {k: v for k, v in body["params"].items() if v is not None}
    model_ref = resolve_model(session, settings, owner, body["model"])
    for field in MODEL_PARAMS:  # resolved like `model`; the worker reads model_ref[field]
        if isinstance(params.get(field), str):
            model_ref[field] = resolve_model(session, settings, owner, params[field])
    for field in DATA_PARAMS:
        if isinstance(params.get(field), str):
            _check_data(session, owner, field, params[field])
    job = Job(id=new_id("job"), owner_id=owner.id, type=body["type"], model=body["model"], model_ref=model_ref,
              params=params, status="queued", progress=0.0, queue=settings.queue(QUEUE_KIND[body["type"]]),
              cancel_requested=False, attempts=0, idempotency_key=idempotency_key, request_hash=digest,
              created_at=utcnow())
    session.add(job)
    queued = store.make_event(0, "status", {"status": "queued"})
    store.add_events(session, job.id, [queued])
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        if idempotency_key:  # a concurrent submit with the same key won the race
            existing = repo.by_idempotency_key(session, owner.id, idempotency_key)
            if existing is not None and existing.request_hash == digest:
                return existing, False
            raise Conflict("this Idempotency-Key was used with a different request; use a new key",
                           code="idempotency_conflict")
        raise
    try:
        bus.publish(job.id, queued)
    except Exception:
        log.warning("could not publish the queued event of %s", job.id, exc_info=True)
    try:
        dispatcher.enqueue(job.id, job.queue)
    except Exception as exc:
        log.exception("enqueue of %s failed", job.id)
        job.status, job.finished_at = "failed", utcnow()
        job.error_code, job.error_message = "enqueue_failed", f"the job could not be queued: {exc}"
        store.add_events(session, job.id, [store.make_event(1, "status", {"status": "failed",
                                                                          "error": {"code": job.error_code,
                                                                                    "message": job.error_message}})])
        session.commit()
        raise ServiceUnavailable(f"the job {job.id} could not be queued (broker unreachable?): {exc}",
                                 code="enqueue_failed", job_id=job.id) from exc
    return job, True


def get(session: Session, job_id: str, owner: ApiKey) -> Job:
    job = repo.get(session, job_id, owner.id)
    if job is None:
        raise NotFound(f"job {job_id!r} not found", code="job_not_found")
    return job


def list_jobs(session: Session, owner: ApiKey, *, status: Optional[str], type_: Optional[str], limit: int,
              after: Optional[str]) -> tuple[list[Job], Optional[str]]:
    cursor = None
    if after:
        cursor = repo.get(session, after, owner.id)
        if cursor is None:
            raise InvalidRequest(f"after={after!r} is not a job id from a previous page", code="invalid_cursor")
    rows = repo.page(session, owner.id, status=status, type_=type_, limit=limit + 1, after=cursor)
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1].id if more and rows else None)


def cancel(session: Session, bus, job_id: str, owner: ApiKey) -> Job:
    job = get(session, job_id, owner)
    if job.finished:
        raise Conflict(f"job {job_id} already {job.status}; only queued or running jobs can be cancelled",
                       code="job_finished")
    if job.status == "queued" and repo.cancel_if_queued(session, job.id):
        event = store.make_event(store.max_seq(session, job.id) + 1, "status",
                                 {"status": "cancelled", "reason": "cancelled before it started"})
        store.add_events(session, job.id, [event])
        session.commit()
        session.refresh(job)
        try:
            bus.publish(job.id, event)
            bus.finish(job.id)
        except Exception:
            log.warning("could not publish the cancel of %s", job.id, exc_info=True)
        return job
    # Running (or claimed a moment ago): ask the worker to stop at its next step.
    session.refresh(job)
    if job.finished:
        raise Conflict(f"job {job_id} already {job.status}", code="job_finished")
    job.cancel_requested = True
    session.commit()
    try:
        bus.request_cancel(job.id)
    except Exception:
        log.warning("could not set the cancel flag of %s on the bus; the worker also polls the database",
                    job.id, exc_info=True)
    return job
