"""Celery tasks: thin wrappers that take a job id (see runner.py for the work, api/jobs/reaper.py
for the reaper).

Shutdown: a worker told to stop (SIGTERM to its main process, or to the whole process group)
does not wait for a running job to end: the job stops at its next step, goes back to `queued`
with its attempt given back, and is sent to the queue again for another worker. The main
process forwards SIGTERM to its pool children; in a child, the task catches it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from celery import shared_task
from celery.signals import worker_process_init, worker_shutting_down

from api.dispatch import RUN_JOB
from welore_core.heap import fix_malloc_thresholds

log = logging.getLogger("welore.worker")

SHUTDOWN = threading.Event()  # this process is stopping: running jobs hand themselves back
_in_pool_child = False
fix_malloc_thresholds()  # as `welore` does: a worker started by `celery -A worker.celery_app` too (children inherit it)


def _settings(task):
    return task.app.conf.welore_settings


@shared_task(name=RUN_JOB, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_job_task(self, job_id: str) -> str:
    from .runner import bus_for, run_job

    settings = _settings(self)

    def enqueue(job_id: str, queue: str) -> None:
        self.app.send_task(RUN_JOB, args=[job_id], queue=queue)

    previous = None
    if _in_pool_child and threading.current_thread() is threading.main_thread():
        SHUTDOWN.clear()  # a new task in a child that is not stopping
        previous = signal.signal(signal.SIGTERM, lambda *_: SHUTDOWN.set())
    try:
        return run_job(job_id, settings, bus_for(settings), shutdown=SHUTDOWN, enqueue=enqueue)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@shared_task(name="welore.reap", bind=True)
def reap_task(self) -> int:
    """One reaper pass (for `celery beat`; the API process runs the same pass on its own)."""
    from api.jobs.reaper import reap_once

    from .runner import bus_for

    settings = _settings(self)
    return len(reap_once(settings, bus_for(settings),
                         lambda job_id, queue: self.app.send_task(RUN_JOB, args=[job_id], queue=queue)))


@worker_process_init.connect(weak=False)
def _mark_pool_child(**_kw) -> None:
    global _in_pool_child
    _in_pool_child = True


@worker_shutting_down.connect(weak=False)
def _on_shutdown(**_kw) -> None:
    """Main process: tell the jobs to hand themselves back (solo pool: this process; prefork: the children)."""
    SHUTDOWN.set()
    try:
        import psutil

        for child in psutil.Process(os.getpid()).children():
            try:
                child.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
    except Exception:
        log.warning("could not forward the shutdown to the pool processes", exc_info=True)
