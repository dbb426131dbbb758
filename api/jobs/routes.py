"""/v1/jobs: submit, list, read, cancel; events (SSE or JSON) and metrics of a job.

Handlers hold a database session only around their queries (`with db() as s:`). The SSE
endpoint is an async generator fed by the process's event fan-out: a follower holds no thread
and no connection while it waits."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Literal, Optional

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..deps import BusDep, CurrentKey, DbDep, DispatcherDep, FanOutDep, JobId, SettingsDep
from ..errors import InvalidRequest, responses
from ..events import store
from ..events.fanout import END, REVOKED
from ..models import STATUSES, TERMINAL
from ..strictjson import StrictJsonRoute
from . import service
from .schemas import Event, JobCreate, JobList, JobOut, MetricPoint, Metrics

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=StrictJsonRoute)

IdempotencyKey = Annotated[Optional[str], Header(alias="Idempotency-Key", min_length=1, max_length=255,
                                                 pattern=r"^[\x21-\x7e]+$",
                                                 description="printable ASCII; a repeat returns the same job")]
LastEventId = Annotated[Optional[str], Header(alias="Last-Event-ID", max_length=40,
                                              description="resume after this event seq (sent by EventSource)")]
KEEPALIVE_S = 15.0


@router.post("", status_code=202, response_model=JobOut, summary="Submit a compress, finetune or evaluate job",
             responses=responses(400, 401, 404, 409, 415, 422, 503))
def submit_job(body: JobCreate, response: Response, key: CurrentKey, db: DbDep, settings: SettingsDep,
               dispatcher: DispatcherDep, bus: BusDep, idempotency_key: IdempotencyKey = None) -> JobOut:
    job, created = service.submit(db, settings, dispatcher, bus, key, body.model_dump(mode="json"), idempotency_key)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return service.to_out(job, bus)


@router.get("", response_model=JobList, summary="Your jobs, newest first (cursor pagination)",
            responses=responses(401, 422))
def list_jobs(key: CurrentKey, db: DbDep, bus: BusDep,
              status: Optional[Literal[STATUSES]] = None,  # type: ignore[valid-type]
              type: Optional[Literal["compress", "finetune", "evaluate"]] = None,
              limit: Annotated[int, Query(ge=1, le=200)] = 50,
              after: Annotated[Optional[str], Query(max_length=64, description="next_cursor of the previous page")] = None,
              ) -> JobList:
    with db() as s:
        rows, cursor = service.list_jobs(s, key, status=status, type_=type, limit=limit, after=after)
    return JobList(data=[service.to_out(j, bus) for j in rows], next_cursor=cursor)


@router.get("/{job_id}", response_model=JobOut, summary="A job's status, progress, result and latest metrics",
            responses=responses(401, 404, 422))
def get_job(job_id: JobId, key: CurrentKey, db: DbDep, bus: BusDep) -> JobOut:
    with db() as s:
        job = service.get(s, job_id, key)
    return service.to_out(job, bus)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut,
             summary="Cancel a queued (never starts) or running (stops at its next step) job",
             responses=responses(401, 404, 409, 422))
def cancel_job(job_id: JobId, key: CurrentKey, db: DbDep, bus: BusDep) -> JobOut:
    return service.to_out(service.cancel(db, bus, job_id, key), bus)


def _sse(event: dict) -> str:
    return f"id: {event['seq']}\nevent: {event['type']}\ndata: {json.dumps(event, default=str)}\n\n"


def _is_end(event: dict) -> bool:
    return event["type"] == "status" and event["data"].get("status") in TERMINAL


def _history(db, bus, job_id: str, after: int, types: tuple[str, ...] = ()) -> list[dict]:
    """The job's events after seq `after` (of `types` only, when given): the database's, then the bus's."""
    with db() as s:
        events = store.events_after(s, job_id, after, types)
    last = events[-1]["seq"] if events else after
    try:  # newer ones the worker has not flushed yet
        events += [e for e in bus.read(job_id, last, 0.0) if not types or e["type"] in types]
    except Exception:  # the bus is an accelerator; the database is the record
        pass
    return events


async def _stream(db, bus, fanout, job_id: str, after: int, key_id: str):
    """History (database, then the bus), then live events from the fan-out until the job ends (or
    the caller's key is revoked)."""
    last = after
    for e in await run_in_threadpool(_history, db, bus, job_id, last):
        yield _sse(e)
        last = e["seq"]
        if _is_end(e):
            return
    sub = fanout.subscribe(job_id, last, key_id)
    try:
        batches = [await run_in_threadpool(_history, db, bus, job_id, last)]  # what came meanwhile
        while True:
            for batch in batches:
                if batch is END:
                    return
                if batch is REVOKED:
                    yield ": the API key was revoked\n\n"
                    return
                for e in batch:
                    if e["seq"] <= last:
                        continue
                    yield _sse(e)
                    last = e["seq"]
                    if _is_end(e):
                        return
            try:
                batches = [await asyncio.wait_for(sub.queue.get(), KEEPALIVE_S)]
            except asyncio.TimeoutError:
                batches = []
                yield ": keepalive\n\n"
    finally:
        fanout.unsubscribe(sub)


def _after(last_event_id: Optional[str]) -> int:
    if last_event_id is None or last_event_id == "":
        return -1
    value = last_event_id.strip()
    if not value.isdigit() or not value.isascii() or len(value) > 10 or int(value) >= 2**31:
        raise InvalidRequest(f"Last-Event-ID: expected the seq of an event (an integer 0 ≤ seq < 2³¹), got "
                             f"{last_event_id[:40]!r}", code="invalid_last_event_id")
    return int(value)


@router.get("/{job_id}/events", summary="Server-Sent Events: history then live events until the job ends",
            responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}},
                                         "application/json": {"schema": {"type": "array",
                                                                         "items": Event.model_json_schema(
                                                                             ref_template="#/components/schemas/{model}")}}},
                             "description": "an SSE stream, or with ?format=json the history as a list"},
                       **responses(401, 404, 422)})
async def job_events(job_id: JobId, key: CurrentKey, db: DbDep, bus: BusDep, fanout: FanOutDep,
                     format: Literal["sse", "json"] = "sse", last_event_id: LastEventId = None):
    after = _after(last_event_id)

    def check():
        with db() as s:
            service.get(s, job_id, key)

    await run_in_threadpool(check)
    if format == "json":
        events = await run_in_threadpool(_history, db, bus, job_id, -1)
        return [Event.model_validate(e) for e in events]
    return StreamingResponse(_stream(db, bus, fanout, job_id, after, key.id), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


MAX_POINTS = 1000


def _downsample(points: list, n: int) -> list:
    """At most `n` of `points`, evenly spaced, the first and the last always among them."""
    if len(points) <= n:
        return points
    return [points[round(i * (len(points) - 1) / (n - 1))] for i in range(n)]


@router.get("/{job_id}/metrics", response_model=Metrics,
            summary="Metric series (memory, throughput, loss, ...) and the final metrics",
            description=f"Each series has at most `max_points` points (default {MAX_POINTS}), evenly spaced over "
                        "the job's metric events, the first and the last always kept; the full record is in "
                        "GET /v1/jobs/{job_id}/events?format=json.",
            responses=responses(401, 404, 422))
def job_metrics(job_id: JobId, key: CurrentKey, db: DbDep, bus: BusDep,
                max_points: Annotated[int, Query(ge=2, le=10_000)] = MAX_POINTS) -> Metrics:
    with db() as s:
        job = service.get(s, job_id, key)
    raw: dict[str, list[tuple[dict, float]]] = {}
    for e in _history(db, bus, job_id, -1, ("metric",)):
        for name, value in (e["data"].get("values") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                raw.setdefault(name, []).append((e, float(value)))
    series = {name: [MetricPoint(seq=e["seq"], time=e["time"], stage=e["data"].get("stage"),
                                 step=e["data"].get("step"), value=value)
                     for e, value in _downsample(points, max_points)]
              for name, points in raw.items()}
    out = service.to_out(job, bus)
    return Metrics(series=series, final=job.metrics if job.finished else None, latest=out.metrics)
