"""Getting a committed job to a worker: Celery on Redis in production, or a thread pool inside
the embedded server running the very same task function (worker/runner.py)."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("welore.dispatch")

RUN_JOB = "welore.run_job"
REAP = "welore.reap"


def dispatch(db_url: str, bus, enqueue, job_id: str, queue: str) -> None:
    """Send a committed, queued job to its workers (`enqueue(job_id, queue)`, which raises when the
    broker is unreachable), leave the bus's sent mark next to the message, then mark the row sent.
    A job never marked sent in its row, or whose bus mark is gone (the broker lost the message), is
    sent again by the reaper. A message sent twice is harmless: only one delivery can claim the job."""
    from .db import session_scope
    from .jobs import states

    enqueue(job_id, queue)
    try:
        bus.mark_sent(job_id)
    except Exception:  # sent all the same; at worst the reaper sends it once more
        log.warning("could not leave the sent mark of %s on the bus", job_id, exc_info=True)
    try:
        with session_scope(db_url) as s:
            states.dispatched(s, job_id)
    except Exception:  # sent all the same; at worst the reaper sends it once more
        log.warning("could not mark %s dispatched", job_id, exc_info=True)


class CeleryDispatcher:
    def __init__(self, settings):
        from worker.celery_app import make_celery  # celery only: no torch

        self.settings = settings
        self.app = make_celery(settings)

    def enqueue(self, job_id: str, queue: str) -> None:
        self.app.send_task(RUN_JOB, args=[job_id], queue=queue)

    def ping(self) -> bool:
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=3)
            return True
        except Exception:
            return False

    def close(self) -> None:
        """Nothing to do: kombu's connection pools are shared per broker URL by every Celery app
        of the process, so closing them here would break other apps (e.g. a second API instance)."""


class ThreadDispatcher:
    """Embedded mode: jobs run asynchronously in worker threads of the API process."""

    def __init__(self, settings, bus):
        self.settings, self.bus = settings, bus
        self.shutdown = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=max(1, settings.embedded_workers),
                                       thread_name_prefix="welore-job")

    def enqueue(self, job_id: str, queue: str) -> None:
        if self.shutdown.is_set():
            raise RuntimeError("the server is shutting down")
        self.pool.submit(self._run, job_id)

    def _run(self, job_id: str) -> None:
        from worker.runner import run_job

        try:
            run_job(job_id, self.settings, self.bus, shutdown=self.shutdown)
        except Exception:
            log.exception("job %s crashed the runner", job_id)

    def ping(self) -> bool:
        return not self.shutdown.is_set()

    def close(self) -> None:
        """Running jobs stop at their next step and go back to `queued` (resumed on next start)."""
        self.shutdown.set()
        self.pool.shutdown(wait=True, cancel_futures=True)


def make_dispatcher(settings, bus):
    return ThreadDispatcher(settings, bus) if settings.embedded else CeleryDispatcher(settings)
