"""The Celery application, built from the service settings. `celery -A worker.celery_app worker`
works directly; `welore worker` wraps it. Importing this module imports celery, never torch."""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from api.settings import Settings, get_settings
from welore_core.settings import configure

def make_celery(settings: Settings) -> Celery:
    if not settings.redis_url:
        raise RuntimeError("Celery needs a broker: set WELORE_REDIS_URL (embedded `welore serve` needs no worker)")
    configure(settings)  # the core's cache dir, data dir and device come from the service's settings
    app = Celery("welore", broker=settings.redis_url, include=["worker.tasks"])
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
        task_routes={"welore.run_job": {"queue": gpu}, "welore.reap": {"queue": light}},
        # `celery -A worker.celery_app beat` runs the reaper without any API process.
        beat_schedule={"welore-reap": {"task": "welore.reap", "schedule": settings.reap_every_s}},
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


app = make_celery(get_settings()) if get_settings().redis_url else None
