"""GET /healthz (the process is up) and GET /readyz (database, broker and artifact store reachable, and
the store's free space above WELORE_ARTIFACT_MIN_FREE_MB)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text

from . import storage
from .db import session_scope
from .strictjson import StrictJsonRoute

router = APIRouter(tags=["health"], route_class=StrictJsonRoute)


class Readiness(BaseModel):
    status: str
    mode: str
    checks: dict[str, str]
    artifact_store_free_bytes: int | None = None


@router.get("/healthz", summary="The process is up")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Database, broker and artifact store reachable; the store has free space",
            responses={200: {"model": Readiness}, 503: {"model": Readiness, "description": "something is not reachable"}})
def readyz(request: Request):
    settings = request.app.state.settings
    checks: dict[str, str] = {}
    try:
        with session_scope(settings.db_url) as s:
            s.execute(text("SELECT 1 FROM jobs LIMIT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    broker_ok = request.app.state.dispatcher.ping() and request.app.state.bus.ping()
    checks["broker"] = "ok" if broker_ok else "error: unreachable"
    checks["artifact_store"] = "ok" if storage.writable(settings) else "error: not writable (WELORE_ARTIFACT_DIR)"
    checks["artifact_store_space"], free = _space(settings)
    ok = all(v == "ok" for v in checks.values())
    body = {"status": "ready" if ok else "not_ready", "mode": "embedded" if settings.embedded else "distributed",
            "checks": checks, "artifact_store_free_bytes": free}
    return JSONResponse(body, status_code=200 if ok else 503)


def _space(settings) -> tuple[str, int | None]:
    """('ok' or why not, free bytes) of the artifact store against WELORE_ARTIFACT_MIN_FREE_MB."""
    try:
        free = storage.free_bytes(settings)
    except OSError as exc:
        return f"error: {type(exc).__name__}", None
    if free < settings.artifact_min_free_mb * 2**20:
        return (f"error: {free / 2**20:.1f} MiB free, below WELORE_ARTIFACT_MIN_FREE_MB "
                f"({settings.artifact_min_free_mb} MiB); free space in the artifact store"), free
    return "ok", free
