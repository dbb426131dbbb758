"""The embedded server's in-process worker: jobs run in threads of the API process (worker/runner.py's
`run_job`, the same function the Celery task calls). `create_app` is the API app with it; `welore
serve` and the tests build the embedded app this way (the API itself never imports the worker)."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from api.app import create_app as create_api_app

from .runner import run_job

log = logging.getLogger("welore.dispatch")


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


def create_app(settings=None):
    """api.app.create_app with the in-process worker (used when the settings are embedded)."""
    return create_api_app(settings, in_process=ThreadDispatcher)
