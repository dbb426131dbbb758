"""The job state machine: every status transition of a job, used by the API, the Celery tasks,
the embedded runner and the reaper. Each one is a conditional `UPDATE jobs … WHERE status = …
RETURNING`, so two actors (a worker and the reaper, two deliveries of one task, a cancel and a
claim) can never both win.

    queued  ──claim──▶ running ──finish──▶ succeeded | cancelled
    queued  ──cancel─▶ cancelled           running ──fail────▶ failed
                                           running ──requeue─▶ queued  (shutdown: attempt given back)
    running ──reap───▶ queued (attempts left) | failed `worker_lost` | cancelled (cancel requested)
    running ──heartbeat / progress──▶ running, while the claim (`runner`) is still the caller's
    queued  ──dispatched──▶ queued, its task message sent (`undispatched_since` cleared)

Whatever makes a job `queued` also sets `undispatched_since`; `dispatched` clears it once the
task message reached the broker (api/dispatch.py `dispatch`). A job left queued and undispatched
(the broker was down when it was submitted or sent back) is sent again by the reaper
(`undispatched`), and so is a dispatched one whose message the broker lost (`sent_queued`, checked
against the bus's sent marks).

A worker's claim is the `runner` token it wrote at `claim`; its heartbeats, its end and its
requeue only match while it holds that claim, so a worker that was reaped (presumed dead) finds
out at its next heartbeat and stops without touching the job again.

Functions take an open session (the caller commits), write the status event in the same
transaction and return a `Transition(job, event)`, or None when the guard did not match. The
caller publishes the event on the bus after the commit.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Iterable, Optional

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from ..events import store
from ..models import Job, JobStatus, utcnow

QUEUED, RUNNING = JobStatus.QUEUED, JobStatus.RUNNING
SUCCEEDED, FAILED, CANCELLED = JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED


@dataclass
class Transition:
    job: Job
    event: Optional[dict]  # the status event written with it (None: no status change)


def next_seq(session: Session, bus, job_id: str) -> int:
    """The seq of a job's next event: after everything in the database and on the bus."""
    try:
        last = bus.last_seq(job_id) if bus is not None else -1
    except Exception:  # the bus is an accelerator; the database is the record
        last = -1
    return max(store.max_seq(session, job_id), last) + 1


def _update(session: Session, job_id: str, from_: Iterable[JobStatus], where: tuple = (), **values) -> Optional[Job]:
    stmt = (update(Job).where(Job.id == job_id, Job.status.in_([s.value for s in from_]), *where)
            .values(**values).returning(Job)
            .execution_options(synchronize_session=False, populate_existing=True))
    return session.execute(stmt).scalars().one_or_none()


def _status_event(session: Session, job: Job, seq: int, data: dict, events: Iterable[dict] = ()) -> dict:
    event = store.make_event(seq, "status", {"status": job.status, **data})
    store.add_events(session, job.id, [*events, event])
    return event


# -- the API ------------------------------------------------------------------------------
def submit(session: Session, job: Job) -> Transition:
    """A new job row, `queued`, with its first event (seq 0)."""
    job.status = QUEUED.value
    job.undispatched_since = utcnow()
    session.add(job)
    return Transition(job, _status_event(session, job, 0, {}))


def cancel(session: Session, bus, job_id: str, owner_id: str) -> Optional[Transition]:
    """queued → cancelled at once; running → `cancel_requested` (the worker stops at its next step
    and ends the job `cancelled`). None: the job is unknown or already finished."""
    now = utcnow()
    job = _update(session, job_id, [QUEUED], (Job.owner_id == owner_id,), status=CANCELLED.value,
                  finished_at=now, cancel_requested=True)
    if job is not None:
        return Transition(job, _status_event(session, job, next_seq(session, bus, job_id),
                                             {"reason": "cancelled before it started"}))
    job = _update(session, job_id, [RUNNING], (Job.owner_id == owner_id,), cancel_requested=True)
    return Transition(job, None) if job is not None else None


def dispatched(session: Session, job_id: str) -> Optional[Job]:
    """The queued job's task message was sent: no longer one for the reaper to send again."""
    return _update(session, job_id, [QUEUED], (Job.undispatched_since.is_not(None),), undispatched_since=None)


# -- a worker -----------------------------------------------------------------------------
def claim(session: Session, bus, job_id: str, runner: str, max_attempts: int) -> tuple[Optional[Transition], str]:
    """queued → running for `runner`, spending one attempt. → (transition, "") when claimed, else
    (transition or None, why): why is the job's status or "missing", or what was done instead: a
    queued job with a cancel request is cancelled, one with no attempts left is failed."""
    now = utcnow()
    job = _update(session, job_id, [QUEUED], (Job.cancel_requested.is_(False), Job.attempts < max_attempts),
                  status=RUNNING.value, attempts=Job.attempts + 1, started_at=func.coalesce(Job.started_at, now),
                  heartbeat_at=now, runner=runner, stage=None, progress=0.0, error_code=None, error_message=None)
    if job is not None:
        event = _status_event(session, job, next_seq(session, bus, job_id),
                              {"attempt": job.attempts, "max_attempts": max_attempts})
        return Transition(job, event), ""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        return None, "missing"
    if job.status != QUEUED.value:
        return None, job.status
    if job.cancel_requested:
        job = _update(session, job_id, [QUEUED], status=CANCELLED.value, finished_at=now)
        event = _status_event(session, job, next_seq(session, bus, job_id),
                              {"reason": "cancelled before it started"}) if job is not None else None
        return (Transition(job, event) if job is not None else None), "cancelled"
    message = (f"the job was started {job.attempts} times (WELORE_MAX_ATTEMPTS={max_attempts}) and its worker was "
               "lost each time (out of memory? killed?); resubmit it, perhaps with smaller settings")
    job = _update(session, job_id, [QUEUED], status=FAILED.value, finished_at=now, error_code="worker_lost",
                  error_message=message)
    if job is None:
        return None, "gave up"
    event = _status_event(session, job, next_seq(session, bus, job_id),
                          {"error": {"code": "worker_lost", "message": message}})
    return Transition(job, event), "gave up"


def progress(session: Session, job_id: str, runner: str, **values) -> Optional[Job]:
    """Heartbeat (and stage/progress/metrics, when given) of a running job; None when `runner`
    no longer holds the claim (the job was reaped, cancelled or finished)."""
    return _update(session, job_id, [RUNNING], (Job.runner == runner,), heartbeat_at=utcnow(), **values)


def heartbeat(session: Session, job_id: str, runner: str) -> Optional[Job]:
    return progress(session, job_id, runner)


def finish(session: Session, job_id: str, runner: str, status: JobStatus, seq: int, *, result=None,
           metrics=None, stage=None, events: Iterable[dict] = ()) -> Optional[Transition]:
    """running → succeeded | cancelled, for the worker holding the claim."""
    assert status in (SUCCEEDED, CANCELLED)
    values = {"status": status.value, "finished_at": utcnow(), "heartbeat_at": utcnow(), "result": result,
              "metrics": metrics}
    if status is SUCCEEDED:
        values["progress"] = 1.0
    if stage:
        values["stage"] = stage
    job = _update(session, job_id, [RUNNING], (Job.runner == runner,), **values)
    return Transition(job, _status_event(session, job, seq, {}, events)) if job is not None else None


def fail(session: Session, job_id: str, runner: str, code: str, message: str, seq: int, *, metrics=None,
         stage=None, events: Iterable[dict] = ()) -> Optional[Transition]:
    """running → failed, for the worker holding the claim."""
    values = {"status": FAILED.value, "finished_at": utcnow(), "heartbeat_at": utcnow(), "error_code": code,
              "error_message": message, "metrics": metrics}
    if stage:
        values["stage"] = stage
    job = _update(session, job_id, [RUNNING], (Job.runner == runner,), **values)
    if job is None:
        return None
    return Transition(job, _status_event(session, job, seq, {"error": {"code": code, "message": message}}, events))


def requeue(session: Session, job_id: str, runner: str, seq: int, *, give_back_attempt: bool, reason: str,
            events: Iterable[dict] = ()) -> Optional[Transition]:
    """running → queued by the worker holding the claim (a graceful shutdown gives its attempt back)."""
    job = _update(session, job_id, [RUNNING], (Job.runner == runner,), status=QUEUED.value, runner=None,
                  heartbeat_at=None, stage=None, progress=0.0, undispatched_since=utcnow(),
                  attempts=Job.attempts - 1 if give_back_attempt else Job.attempts)
    return Transition(job, _status_event(session, job, seq, {"reason": reason}, events)) if job is not None else None


# -- the reaper ---------------------------------------------------------------------------
def stale(session: Session, timeout_s: float) -> list[str]:
    """Ids of running jobs whose heartbeat is older than `timeout_s`."""
    cutoff = utcnow() - dt.timedelta(seconds=timeout_s)
    return list(session.scalars(select(Job.id).where(Job.status == RUNNING.value, Job.heartbeat_at < cutoff)))


def undispatched(session: Session, older_than_s: float) -> list[tuple[str, str]]:
    """(id, queue) of queued jobs whose task message was not sent for `older_than_s`: a broker that was
    down when they were submitted back (a worker's shutdown, a reaping), or a sender that died."""
    cutoff = utcnow() - dt.timedelta(seconds=older_than_s)
    return list(session.execute(select(Job.id, Job.queue).where(Job.status == QUEUED.value,
                                                                Job.undispatched_since < cutoff)).tuples())


def sent_queued(session: Session) -> list[tuple[str, str]]:
    """(id, queue) of queued jobs whose task message was sent (the reaper checks that the broker
    still holds it: api/events/bus.py, sent marks)."""
    return list(session.execute(select(Job.id, Job.queue).where(Job.status == QUEUED.value,
                                                                Job.undispatched_since.is_(None))).tuples())


def reap(session: Session, bus, job_id: str, timeout_s: float, max_attempts: int) -> Optional[Transition]:
    """A running job whose heartbeat is older than `timeout_s` lost its worker: back to queued while
    attempts are left, else failed `worker_lost`; cancelled when a cancel was requested."""
    cutoff = utcnow() - dt.timedelta(seconds=timeout_s)
    seen = session.get(Job, job_id, populate_existing=True)
    if seen is None or seen.status != RUNNING.value or (seen.heartbeat_at is not None and seen.heartbeat_at >= cutoff):
        return None
    guard = (Job.heartbeat_at < cutoff, Job.runner == seen.runner) if seen.runner else (Job.heartbeat_at < cutoff,)
    now = utcnow()
    silent = f"no heartbeat from its worker for {timeout_s:.0f} s (WELORE_HEARTBEAT_TIMEOUT_S)"
    if seen.cancel_requested:
        job = _update(session, job_id, [RUNNING], guard, status=CANCELLED.value, finished_at=now, runner=None)
        data = {"reason": f"cancel requested; {silent}"}
    elif seen.attempts < max_attempts:
        job = _update(session, job_id, [RUNNING], guard, status=QUEUED.value, runner=None, heartbeat_at=None,
                      stage=None, progress=0.0, undispatched_since=now)
        data = {"reason": f"worker_lost: {silent}; it runs again (attempt {seen.attempts + 1} of {max_attempts})"}
    else:
        message = (f"the worker running this job was lost ({silent}) on each of its {seen.attempts} attempts "
                   f"(WELORE_MAX_ATTEMPTS={max_attempts}); resubmit it, perhaps with smaller settings")
        job = _update(session, job_id, [RUNNING], guard, status=FAILED.value, finished_at=now, runner=None,
                      error_code="worker_lost", error_message=message)
        data = {"error": {"code": "worker_lost", "message": message}}
    if job is None:
        return None
    return Transition(job, _status_event(session, job, next_seq(session, bus, job_id), data))
