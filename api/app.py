"""The FastAPI application factory: routers per resource, one error handler, and a lifespan that
sizes the request thread pool, opens the event bus, its fan-out and the dispatcher, starts the
reaper, and (embedded) locks the state directory and re-queues jobs a previous run left. It serves
the web console at `/` and the API docs at /docs with their assets (no CDN)."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Optional

import anyio.to_thread
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from welore_core.settings import configure

from . import console, errors
from .artifacts.routes import links_router
from .artifacts.routes import router as artifacts_router
from .catalog.routes import datasets_router
from .catalog.routes import router as models_router
from .db import engine_for
from .dispatch import InProcess, make_dispatcher
from .events.bus import make_bus
from .events.fanout import FanOut
from .files.routes import router as files_router
from .health import router as health_router
from .jobs.dispatch import dispatch
from .jobs.params import PARAMS
from .jobs.reaper import Reaper
from .jobs.routes import router as jobs_router
from .reports.routes import router as reports_router
from .settings import Settings, get_settings

log = logging.getLogger("welore.api")


def recover_embedded(settings: Settings, bus, dispatcher) -> list[str]:
    """Embedded start (the state directory is locked, so no other process runs its jobs): jobs a
    previous run left `running` lost their worker (reaped: back to queued while attempts are left);
    every queued job is handed to the in-process worker."""
    from sqlalchemy import select

    from .db import session_scope
    from .jobs import states
    from .models import Job, JobStatus

    with session_scope(settings.db_url) as s:
        running = list(s.scalars(select(Job.id).where(Job.status == JobStatus.RUNNING.value)))
    for job_id in running:
        with session_scope(settings.db_url) as s:
            t = states.reap(s, bus, job_id, 0.0, settings.max_attempts)
        if t is not None:
            bus.publish(job_id, t.event)
    with session_scope(settings.db_url) as s:
        queued = [(j.id, j.queue) for j in s.scalars(select(Job).where(Job.status == JobStatus.QUEUED.value)
                                                     .order_by(Job.created_at))]
    for job_id, queue in queued:
        dispatch(settings.db_url, bus, dispatcher.enqueue, job_id, queue)
    return [i for i, _ in queued]


def create_app(settings: Optional[Settings] = None, in_process: Optional[InProcess] = None) -> FastAPI:
    """The app. Embedded settings need `in_process`, the dispatcher that runs jobs in this process
    (worker/embedded.py's create_app passes it); otherwise jobs go to Celery workers by task name."""
    settings = settings or get_settings()
    configure(settings)  # the core's cache dir, data dir and device come from the service's settings

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.embedded:
            from .statelock import acquire

            acquire(settings.state_dir)
        # One setting sizes both: request threads = pooled connections (+ fan-out, reaper, spare).
        anyio.to_thread.current_default_thread_limiter().total_tokens = max(1, settings.api_concurrency)
        engine_for(settings.db_url, settings.db_pool_size)
        app.state.bus = make_bus(settings)
        app.state.dispatcher = make_dispatcher(settings, app.state.bus, in_process)
        app.state.fanout = FanOut(settings, app.state.bus)
        app.state.fanout.start()
        if settings.embedded:
            resumed = recover_embedded(settings, app.state.bus, app.state.dispatcher)
            if resumed:
                log.warning("re-queued %d job(s) left by a previous run: %s", len(resumed), ", ".join(resumed))
        reaper = Reaper(settings, app.state.bus, app.state.dispatcher.enqueue)
        reaper.start()
        try:
            yield
        finally:
            reaper.stop()
            app.state.fanout.stop()
            app.state.dispatcher.close()
            close = getattr(app.state.bus, "close", None)
            if close:
                close()

    # FastAPIOffline: /docs and /redoc load their scripts and styles from this app, not from a CDN.
    app = FastAPIOffline(title="welore", version="1", lifespan=lifespan, static_url="/docs-assets",
                         description="Compress LLMs with WeLore, fine-tune their low-rank factors, evaluate them. "
                                     "Authenticate with `Authorization: Bearer <key>` (`welore keys create`). "
                                     "The web console is at `/`.")
    app.state.settings = settings
    errors.install(app, dict(PARAMS))
    for router in (health_router, jobs_router, artifacts_router, links_router, reports_router, files_router,
                   models_router, datasets_router):
        app.include_router(router)
    console.install(app)
    return app
