"""Jobs business logic: submit (validate, persist, commit, then enqueue), read, list, cancel.

A job is enqueued only after its row is committed. A failed enqueue (the broker is down) leaves
the job queued and marked unsent: the reaper sends it once the broker is back, so a submit
during a broker outage is accepted once, and its retries (same Idempotency-Key) replay it.
Status changes go through states.py. Functions that take `db` open their own short sessions
(`with db() as s:`); the others use the caller's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Optional

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from welore_core.compression.config import NO_CALIBRATION
from welore_core.corpus import BUILTIN, PACKAGED

from ..errors import Conflict, InvalidRequest, NotFound
from ..files import service as files_service
from ..models import ID_PATTERN, ApiKey, Job, new_id, utcnow
from ..settings import Settings
from . import repository as repo
from . import states
from .dispatch import dispatch
from .model_ref import resolve_model
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


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _refuse_control_characters(body: dict) -> None:
    """Names (model, datasets, ...) are text: a NUL or another control character is refused."""
    items = [("model", body.get("model"))] + [(f"params.{k}", v) for k, v in (body.get("params") or {}).items()]
    for field, value in items:
        if isinstance(value, str) and _CONTROL.search(value):
            raise InvalidRequest(f"{field}: control characters (such as NUL) are not allowed", code="invalid_params",
                                 fields=[{"field": field, "message": "contains control characters",
                                          "allowed": "printable text"}])


def _replay(existing: Job, digest: str) -> Job:
    if existing.request_hash != digest:
        raise Conflict("this Idempotency-Key was used with a different request; use a new key",
                       code="idempotency_conflict")
    return existing


def submit(db, settings: Settings, dispatcher, bus, owner: ApiKey, body: dict,
           idempotency_key: Optional[str]) -> tuple[Job, bool]:
    """→ (job, created). `body` is the validated request as JSON-able data. The job is committed,
    then enqueued; if the enqueue fails it stays queued for the reaper to send (see above)."""
    _refuse_control_characters(body)
    digest = request_hash(body)
    with db() as session:
        if idempotency_key:
            existing = repo.by_idempotency_key(session, owner.id, idempotency_key)
            if existing is not None:
                return _replay(existing, digest), False
        params = {k: v for k, v in body["params"].items() if v is not None}
        model_ref = resolve_model(session, settings, owner, body["model"])
        for field in MODEL_PARAMS:  # resolved like `model`; the worker reads model_ref[field]
            if isinstance(params.get(field), str):
                model_ref[field] = resolve_model(session, settings, owner, params[field])
        for field in DATA_PARAMS:
            if isinstance(params.get(field), str):
                _check_data(session, owner, field, params[field])
        job = Job(id=new_id("job"), owner_id=owner.id, type=body["type"], model=body["model"], model_ref=model_ref,
                  params=params, progress=0.0, queue=settings.queue(QUEUE_KIND[body["type"]]),
                  cancel_requested=False, attempts=0, idempotency_key=idempotency_key, request_hash=digest,
                  created_at=utcnow())
        queued = states.submit(session, job).event
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            existing = repo.by_idempotency_key(session, owner.id, idempotency_key) if idempotency_key else None
            if existing is None:
                raise
            return _replay(existing, digest), False  # a concurrent submit with the same key won the race
    try:
        bus.publish(job.id, queued)
    except Exception:
        log.warning("could not publish the queued event of %s", job.id, exc_info=True)
    try:
        dispatch(settings.db_url, bus, dispatcher.enqueue, job.id, job.queue)
    except Exception as exc:
        log.warning("could not send %s to a worker (%s: %s); it stays queued and the reaper sends it once "
                    "the broker is reachable", job.id, type(exc).__name__, exc)
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
        cursor = repo.get(session, after, owner.id) if re.fullmatch(ID_PATTERN, after) else None
        if cursor is None:
            raise InvalidRequest(f"after={after[:80]!r} is not a job id from a previous page (pass the "
                                 "next_cursor of the page before)", code="invalid_cursor")
    rows = repo.page(session, owner.id, status=status, type_=type_, limit=limit + 1, after=cursor)
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1].id if more and rows else None)


def cancel(db, bus, job_id: str, owner: ApiKey) -> Job:
    """A queued job is cancelled at once; a running one is asked to stop at its next step."""
    with db() as session:
        job = get(session, job_id, owner)
        t = None if job.finished else states.cancel(session, bus, job_id, owner.id)
        if t is None:
            job = get(session, job_id, owner)
            raise Conflict(f"job {job_id} already {job.status}; only queued or running jobs can be cancelled",
                           code="job_finished")
    try:
        if t.event is not None:
            bus.publish(job_id, t.event)
            bus.finish(job_id)
        else:
            bus.request_cancel(job_id)
    except Exception:
        log.warning("could not publish the cancel of %s on the bus; the worker also polls the database",
                    job_id, exc_info=True)
    return t.job
