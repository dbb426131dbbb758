"""/v1/jobs: submit, list, read, cancel; events (SSE or JSON) and metrics of a job."""

from __future__ import annotations

import json
import time
from typing import Annotated, Literal, Optional

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse

from ..db import session_scope
from ..deps import BusDep, CurrentKey, DispatcherDep, SessionDep, SettingsDep
from ..events import store
from ..models import Job
from . import service
from .schemas import Event, JobCreate, JobList, JobOut, MetricPoint, Metrics

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

TERMINAL_EVENT = ("succeeded", "failed", "cancelled")


@router.post("", status_code=202, response_model=JobOut, summary="Submit a compress, finetune or evaluate job",
             responses={404: {"description": "unknown model or file"},
                        409: {"description": "Idempotency-Key reused with another request"},
                        422: {"description": "invalid params: names the field and the allowed range"}})
def submit_job(body: JobCreate, response: Response, key: CurrentKey, session: SessionDep,
               settings: SettingsDep, dispatcher: DispatcherDep, bus: BusDep,
               idempotency_key: Annotated[Optional[str], Header(alias="Idempotency-Key", max_length=255)] = None,
               ) -> JobOut:
    job, created = service.submit(session, settings, dispatcher, bus, key, body.model_dump(mode="json"),
                                  idempotency_key)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return service.to_out(job, bus)


@router.get("", response_model=JobList, summary="Your jobs, newest first (cursor pagination)")
def list_jobs(key: CurrentKey, session: SessionDep, bus: BusDep,
              status: Optional[Literal["queued", "running", "succeeded", "failed", "cancelled"]] = None,
              type: Optional[Literal["compress", "finetune", "evaluate"]] = None,
              limit: Annotated[int, Query(ge=1, le=200)] = 50,
              after: Annotated[Optional[str], Query(description="next_cursor of the previous page")] = None,
              ) -> JobList:
    rows, cursor = service.list_jobs(session, key, status=status, type_=type, limit=limit, after=after)
    return JobList(data=[service.to_out(j, bus) for j in rows], next_cursor=cursor)


@router.get("/{job_id}", response_model=JobOut, summary="A job's status, progress, result and latest metrics")
def get_job(job_id: str, key: CurrentKey, session: SessionDep, bus: BusDep) -> JobOut:
    return service.to_out(service.get(session, job_id, key), bus)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut,
             summary="Cancel a queued (never starts) or running (stops at its next step) job",
             responses={409: {"description": "the job already finished"}})
def cancel_job(job_id: str, key: CurrentKey, session: SessionDep, bus: BusDep) -> JobOut:
    return service.to_out(service.cancel(session, bus, job_id, key), bus)


def _sse(event: dict) -> str:
    return f"id: {event['seq']}\nevent: {event['type']}\ndata: {json.dumps(event, default=str)}\n\n"


def _is_end(event: dict) -> bool:
    return event["type"] == "status" and event["data"].get("status") in TERMINAL_EVENT


def _stream(settings, bus, job_id: str, after: int, keepalive_s: float = 15.0, poll_db_s: float = 2.0):
    """History (database, then the bus) and then live events until the job ends."""
    last, last_sent, last_db = after, time.monotonic(), 0.0
    with session_scope(settings.db_url) as s:
        history = store.merged_history(s, bus, job_id, last)
    for e in history:
        yield _sse(e)
        last = e["seq"]
        if _is_end(e):
            return
    while True:
        try:
            events = bus.read(job_id, last, 1.0)
        except Exception:
            events = []
            time.sleep(1.0)
        now = time.monotonic()
        if not events and now - last_db >= poll_db_s:  # the database is the fallback if the bus lost events
            last_db = now
            with session_scope(settings.db_url) as s:
                events = store.events_after(s, job_id, last)
                job = s.get(Job, job_id)
                done = job is None or job.finished
            if not events and done:
                return
        for e in events:
            if e["seq"] <= last:
                continue
            yield _sse(e)
            last, last_sent = e["seq"], now
            if _is_end(e):
                return
        if now - last_sent >= keepalive_s:
            yield ": keepalive\n\n"
            last_sent = now


@router.get("/{job_id}/events", summary="Server-Sent Events: history then live events until the job ends",
            responses={200: {"content": {"text/event-stream": {}, "application/json": {}},
                             "description": "an SSE stream, or with ?format=json the history as a list"}})
def job_events(job_id: str, request: Request, key: CurrentKey, session: SessionDep, settings: SettingsDep,
               bus: BusDep, format: Literal["sse", "json"] = "sse",
               last_event_id: Annotated[Optional[str], Header(alias="Last-Event-ID")] = None):
    service.get(session, job_id, key)
    if format == "json":
        return [Event.model_validate(e) for e in store.merged_history(session, bus, job_id)]
    after = int(last_event_id) if last_event_id and last_event_id.isdigit() else -1
    return StreamingResponse(_stream(settings, bus, job_id, after), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/{job_id}/metrics", response_model=Metrics,
            summary="Metric series (memory, throughput, loss, ...) and the final metrics")
def job_metrics(job_id: str, key: CurrentKey, session: SessionDep, bus: BusDep) -> Metrics:
    job = service.get(session, job_id, key)
    series: dict[str, list[MetricPoint]] = {}
    for e in store.merged_history(session, bus, job_id):
        if e["type"] != "metric":
            continue
        d = e["data"]
        for name, value in (d.get("values") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(name, []).append(MetricPoint(seq=e["seq"], time=e["time"], stage=d.get("stage"),
                                                               step=d.get("step"), value=float(value)))
    out = service.to_out(job, bus)
    return Metrics(series=series, final=job.metrics if job.finished else None, latest=out.metrics)
