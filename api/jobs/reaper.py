"""The reaper: puts jobs whose worker was lost back in the queue (or fails them once their
attempts are spent, see states.reap), sends again the queued jobs whose task message never
reached the broker (states.undispatched) or was lost by it (states.sent_queued without a sent
mark on the bus: a Redis restart without persistence, a FLUSH, a failover), and sweeps what dead
attempts left in the artifact store's .tmp. It needs no worker: the API process runs it in a
thread (`Reaper`), every `Settings.reap_every_s`; `celery beat` can run the `welore.reap` task
too. Several reapers at once are safe: every transition is conditional.

A database outage is not a lost heartbeat: every pass records itself in `reaper_watch`, and after
a gap between passes longer than half the heartbeat timeout (the reapers could not read the
heartbeats meanwhile) no job is reaped until a full timeout has been watched again, which gives
the workers time to write their heartbeats once the database is back."""

from __future__ import annotations

import logging
import threading
from typing import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from .. import storage
from ..db import session_scope
from ..models import Job, JobStatus, ReaperWatch, utcnow
from . import states
from .dispatch import dispatch

log = logging.getLogger("welore.reaper")


def _running_ids(settings) -> set[str]:
    with session_scope(settings.db_url) as s:
        return set(s.scalars(select(Job.id).where(Job.status == JobStatus.RUNNING.value)))


def watched_s(session: Session, settings) -> float:
    """Record this pass; → for how long the reapers have read the database without a gap longer
    than half the heartbeat timeout (0 right after one: an outage, or no reaper was running)."""
    now = utcnow()
    row = session.get(ReaperWatch, 1, with_for_update=True)
    if row is None:
        row = ReaperWatch(id=1, last_pass_at=now, watching_since=now)
        session.add(row)
    gap = (now - row.last_pass_at).total_seconds()
    if gap > settings.heartbeat_timeout_s / 2:
        log.warning("no reaper read the database for %.0f s (unreachable, or no reaper ran): no job is reaped "
                    "until its workers have had %.0f s (WELORE_HEARTBEAT_TIMEOUT_S) to write a heartbeat",
                    gap, settings.heartbeat_timeout_s)
        row.watching_since = now
    row.last_pass_at = max(row.last_pass_at, now)
    return (now - row.watching_since).total_seconds()


def _send(settings, bus, enqueue, job_id: str, queue: str, why: str, done: list) -> None:
    try:
        dispatch(settings.db_url, bus, enqueue, job_id, queue)
        done.append((job_id, JobStatus.QUEUED.value))
        log.warning("job %s was queued but %s: sent now", job_id, why)
    except Exception:
        log.warning("could not send %s to a worker (is the broker reachable?)", job_id, exc_info=True)


def _lost_messages(settings, bus) -> list[tuple[str, str]]:
    """Queued jobs marked sent in the database whose sent mark the bus no longer has."""
    with session_scope(settings.db_url) as s:
        sent = states.sent_queued(s)
    if not sent:
        return []
    try:
        there = bus.sent([job_id for job_id, _ in sent])
    except Exception:
        log.warning("could not read the sent marks (is the broker reachable?)", exc_info=True)
        return []
    return [(job_id, queue) for job_id, queue in sent if job_id not in there]


def reap_once(settings, bus, enqueue: Callable[[str, str], None]) -> list[tuple[str, str]]:
    """One pass; → [(job id, its new status)] for each job reaped or sent again."""
    with session_scope(settings.db_url) as s:
        watched = watched_s(s, settings)
        ids = states.stale(s, settings.heartbeat_timeout_s) if watched >= settings.heartbeat_timeout_s else []
    done = []
    for job_id in ids:
        try:
            with session_scope(settings.db_url) as s:
                t = states.reap(s, bus, job_id, settings.heartbeat_timeout_s, settings.max_attempts)
            if t is None:
                continue
            done.append((job_id, t.job.status))
            storage.remove_work_dirs(settings, job_id)
            try:
                bus.publish(job_id, t.event)
                if t.job.finished:
                    bus.finish(job_id)
            except Exception:
                log.warning("could not publish the reaping of %s", job_id, exc_info=True)
            log.warning("job %s lost its worker: now %s", job_id, t.job.status)
            if t.job.status == JobStatus.QUEUED.value:
                dispatch(settings.db_url, bus, enqueue, job_id, t.job.queue)
        except Exception:
            log.warning("could not reap or re-send %s", job_id, exc_info=True)
    with session_scope(settings.db_url) as s:
        unsent = states.undispatched(s, settings.heartbeat_timeout_s)
    for job_id, queue in unsent:
        _send(settings, bus, enqueue, job_id, queue, "never sent to a worker", done)
    for job_id, queue in _lost_messages(settings, bus):
        _send(settings, bus, enqueue, job_id, queue, "the broker lost its task message", done)
    try:
        storage.sweep_tmp(settings, lambda: _running_ids(settings))
    except Exception:
        log.warning("could not sweep %s", storage.tmp_dir(settings), exc_info=True)
    return done


class Reaper(threading.Thread):
    """`reap_once` every `settings.reap_every_s` until `stop()`."""

    def __init__(self, settings, bus, enqueue: Callable[[str, str], None]):
        super().__init__(daemon=True, name="welore-reaper")
        self.settings, self.bus, self.enqueue = settings, bus, enqueue
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.settings.reap_every_s):
            try:
                reap_once(self.settings, self.bus, self.enqueue)
            except Exception:
                log.warning("reaper pass failed", exc_info=True)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)
