"""The Celery application, built from the service settings. `celery -A worker.celery_app worker`
works directly; `welore worker` wraps it. Importing this module imports celery, never torch."""

from __future__ import annotations

from api.dispatch import make_celery as make_service_celery
from api.settings import Settings, get_settings


def make_celery(settings: Settings):
    """The service's Celery app (api/dispatch.py) with this package's tasks."""
    return make_service_celery(settings, include=("worker.tasks",))


app = make_celery(get_settings()) if get_settings().redis_url else None
