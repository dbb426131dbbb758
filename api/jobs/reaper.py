"""The reaper: puts jobs whose worker was lost back in the queue (or fails them once their
attempts are spent, see states.reap), sends again the queued jobs whose task message never
reached the broker (states.undispatched), and sweeps what dead attempts left in the artifact
store's .tmp. It needs no worker: the API process runs it in a thread (`Reaper`), every
`Settings.reap_every_s`; `celery beat` can run the `welore.reap` task too. Several reapers at
once are safe: every transition is conditional."""

from __future__ import annotations

import logging
import threading
from typing import Callable

from sqlalchemy import select

from .. import storage
from ..db import session_scope
from ..dispatch import dispatch
from ..models import Job, JobStatus
from . import states

log = logging.getLogger("welore.reaper")


def _running_ids(settings) -> set[str]:
    with session_scope(settings.db_url) as s:
        return set(s.scalars(select(Job.id).where(Job.status == JobStatus.RUNNING.value)))


def reap_once(settings, bus, enqueue: Callable[[str, str], None]) -> list[tuple[str, str]]:
    """One pass; → [(job id, its new status)] for each job reaped or sent again."""
    with session_scope(settings.db_url) as s:
        ids = states.stale(s, settings.heartbeat_timeout_s)
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
                dispatch(settings.db_url, enqueue, job_id, t.job.queue)
        except Exception:
            log.warning("could not reap or re-send %s", job_id, exc_info=True)
    with session_scope(settings.db_url) as s:
        unsent = states.undispatched(s, settings.heartbeat_timeout_s)
    for job_id, queue in unsent:
        try:
            dispatch(settings.db_url, enqueue, job_id, queue)
            done.append((job_id, JobStatus.QUEUED.value))
            log.warning("job %s was queued but never sent to a worker: sent now", job_id)
        except Exception:
            log.warning("could not send %s to a worker (is the broker reachable?)", job_id, exc_info=True)
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
