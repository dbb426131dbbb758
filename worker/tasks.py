"""Celery tasks: thin wrappers that take a job id (see runner.py for the work)."""

from __future__ import annotations

import logging

from celery import shared_task

log = logging.getLogger("welore.worker")


def _settings(task):
    return task.app.conf.welore_settings


@shared_task(name="welore.run_job", bind=True, acks_late=True, reject_on_worker_lost=True)
def run_job_task(self, job_id: str) -> str:
    from .runner import bus_for, run_job

    settings = _settings(self)
    return run_job(job_id, settings, bus_for(settings))


@shared_task(name="welore.reap", bind=True)
def reap_task(self) -> int:
    from .runner import bus_for, reap_stale

    settings = _settings(self)
    return reap_stale(settings, bus_for(settings))


def _start_reaper(sender=None, **_kw) -> None:
    """In the worker's main process: fail jobs whose worker died, once a minute."""
    import threading

    app = getattr(sender, "app", None)
    settings = getattr(getattr(app, "conf", None), "welore_settings", None)
    if settings is None:
        return

    def loop() -> None:
        from .runner import bus_for, reap_stale

        while True:
            try:
                n = reap_stale(settings, bus_for(settings))
                if n:
                    log.warning("marked %d job(s) failed: their worker stopped responding", n)
            except Exception:
                log.warning("reaper pass failed", exc_info=True)
            stop.wait(60)

    stop = threading.Event()
    threading.Thread(target=loop, daemon=True, name="welore-reaper").start()


from celery.signals import worker_ready  # noqa: E402

worker_ready.connect(_start_reaper, weak=False)
