"""The FastAPI application factory: routers per resource, one error handler, and a lifespan that
opens the event bus and the dispatcher (and, embedded, re-queues jobs a previous run left)."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import FastAPI

from welore_core.settings import configure

from . import errors
from .artifacts.routes import router as artifacts_router
from .catalog.routes import router as models_router
from .dispatch import make_dispatcher
from .events.bus import make_bus
from .files.routes import router as files_router
from .health import router as health_router
from .jobs.params import PARAMS
from .jobs.routes import router as jobs_router
from .settings import Settings, get_settings

log = logging.getLogger("welore.api")


def recover_embedded(settings: Settings, dispatcher) -> list[str]:
    """Embedded restart: jobs left queued or running by the previous process run again."""
    from sqlalchemy import select

    from .db import session_scope
    from .models import Job

    with session_scope(settings.db_url) as s:
        jobs = list(s.scalars(select(Job).where(Job.status.in_(("queued", "running")))
                              .order_by(Job.created_at)))
        for job in jobs:
            job.status = "queued"
            job.heartbeat_at = None
        ids = [(j.id, j.queue) for j in jobs]
    for job_id, queue in ids:
        dispatcher.enqueue(job_id, queue)
    return [i for i, _ in ids]


def create_app(settings: Optional[Settings] = None) -> FastAPI:
    settings = settings or get_settings()
    configure(settings)  # the core's cache dir, data dir and device come from the service's settings

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.bus = make_bus(settings)
        app.state.dispatcher = make_dispatcher(settings, app.state.bus)
        if settings.embedded:
            resumed = recover_embedded(settings, app.state.dispatcher)
            if resumed:
                log.warning("re-queued %d job(s) left by a previous run: %s", len(resumed), ", ".join(resumed))
        try:
            yield
        finally:
            app.state.dispatcher.close()
            close = getattr(app.state.bus, "close", None)
            if close:
                close()

    app = FastAPI(title="welore", version="1", lifespan=lifespan,
                  description="Compress LLMs with WeLore, fine-tune their low-rank factors, evaluate them. "
                              "Authenticate with `Authorization: Bearer <key>` (`welore keys create`).")
    app.state.settings = settings
    errors.install(app, dict(PARAMS))
    for router in (health_router, jobs_router, artifacts_router, files_router, models_router):
        app.include_router(router)
    return app
