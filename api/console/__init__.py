"""The web console: a static single-page app served by the API at `/` (assets under /console/),
talking only to the REST API. Every asset is served by the app (uPlot is vendored under
static/vendor/uplot with its licence; Swagger UI's assets come with fastapi-offline), so it works
with no internet access."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"


def install(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def console_index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    app.mount("/console", StaticFiles(directory=STATIC), name="console")
