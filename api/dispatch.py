"""Getting a committed job to a worker: Celery on Redis in production, or (embedded) a thread pool
inside the API process running the very same task function.

The API never imports the worker: it sends Celery tasks by name (RUN_JOB, REAP: the worker's
tasks register under these names), and an embedded app is given its in-process dispatcher by
whoever builds it (worker/embedded.py, which `welore serve` uses).
"""

from __future__ import annotations

from typing import Callable

from .jobs.dispatch import dispatch  # noqa: F401  (where it has always been imported from)

RUN_JOB = "welore.run_job"
REAP = "welore.reap"


def make_celery(settings, include: tuple[str, ...] = ()):
    """The Celery application of the service (celery only: no torch). The API sends tasks with it;
    the worker (worker/celery_app.py) builds it with `include=("worker.tasks",)` and runs them."""
    from celery import Celery
    from kombu import Exchange, Queue

    from welore_core.settings import configure

    if not settings.redis_url:
        raise RuntimeError("Celery needs a broker: set WELORE_REDIS_URL (embedded `welore serve` needs no worker)")
    configure(settings)  # the core's cache dir, data dir and device come from the service's settings
    app = Celery("welore", broker=settings.redis_url, include=list(include))
    hard = settings.job_time_limit_s
    gpu, light = settings.queue("gpu"), settings.queue("light")
    app.conf.update(
        task_ignore_result=True,  # state lives in the database
        task_acks_late=True,  # a task whose worker died is delivered again; run_job is idempotent
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=hard,
        task_soft_time_limit=max(hard - 60, 1),
        # One direct exchange per queue: a message goes to exactly one queue.
        task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q) for q in (gpu, light)],
        task_default_queue=light,
        task_default_exchange=light,
        task_default_routing_key=light,
        task_routes={RUN_JOB: {"queue": gpu}, REAP: {"queue": light}},
        # `celery -A worker.celery_app beat` runs the reaper without any API process.
        beat_schedule={"welore-reap": {"task": REAP, "schedule": settings.reap_every_s}},
        broker_transport_options={"visibility_timeout": hard + 600},
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        task_publish_retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5,
                                   "interval_max": 2},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
    )
    app.conf.welore_settings = settings
    return app


class CeleryDispatcher:
    def __init__(self, settings):
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


InProcess = Callable[..., object]  # (settings, bus) -> a dispatcher running jobs in this process


def make_dispatcher(settings, bus, in_process: InProcess | None = None):
    if not settings.embedded:
        return CeleryDispatcher(settings)
    if in_process is None:
        raise RuntimeError("embedded mode (no WELORE_REDIS_URL) runs jobs in the API process: build the app "
                           "with worker.embedded.create_app, as `welore serve` does (after an upgrade, re-run "
                           "scripts/setup so that `welore serve` is the current one)")
    return in_process(settings, bus)
