"""GET /v1/jobs/{id}/artifacts, .../artifacts/{name} (ETag, HTTP Range) and .../checkpoint.tar.

Only names recorded for the job can be fetched, and each must resolve inside the job's
directory: any other path is refused with 404. Every file is checked against the size and
SHA-256 recorded when the job finished before it is served; a damaged one is refused with 409
`artifact_corrupt` naming it (never served as if it were fine).
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel

from .. import storage
from ..deps import CurrentKey, SessionDep, SettingsDep
from ..errors import Conflict, NotFound
from ..jobs import repository as repo
from ..jobs import service as jobs_service
from .tarstream import stream_tar, tar_size

router = APIRouter(prefix="/v1/jobs", tags=["artifacts"])


def _check_intact(settings, job_id: str, row, path) -> None:
    if not storage.intact(settings, path, row.size, row.sha256):
        raise Conflict(f"artifact {row.name!r} of job {job_id} no longer matches the SHA-256 recorded when the job "
                       "finished (the stored file is damaged); run the job again", code="artifact_corrupt")


class ArtifactOut(BaseModel):
    name: str
    size: int
    sha256: str
    url: str


class ArtifactList(BaseModel):
    job_id: str
    data: list[ArtifactOut]
    checkpoint_url: str | None = None


@router.get("/{job_id}/artifacts", response_model=ArtifactList, summary="A job's files with size and SHA-256")
def list_artifacts(job_id: str, key: CurrentKey, session: SessionDep) -> ArtifactList:
    job = jobs_service.get(session, job_id, key)
    rows = repo.artifacts(session, job.id)
    return ArtifactList(job_id=job.id, data=[ArtifactOut(name=a.name, size=a.size, sha256=a.sha256,
                                                         url=f"/v1/jobs/{job.id}/artifacts/{a.name}") for a in rows],
                        checkpoint_url=f"/v1/jobs/{job.id}/checkpoint.tar" if rows else None)


@router.get("/{job_id}/artifacts/{name:path}", summary="Download one file (supports Range and If-None-Match)",
            response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}}}, 206: {"description": "a byte range"},
                       404: {"description": "no such artifact (or a path outside the job's artifacts)"},
                       416: {"description": "range not satisfiable"}})
def download_artifact(job_id: str, name: str, request: Request, key: CurrentKey, session: SessionDep,
                      settings: SettingsDep):
    job = jobs_service.get(session, job_id, key)
    row = repo.artifact(session, job.id, name)
    path = storage.safe_child(storage.job_dir(settings, job.id), name) if row is not None else None
    if row is None or path is None:
        raise NotFound(f"job {job.id} has no artifact {name!r}", code="artifact_not_found")
    _check_intact(settings, job.id, row, path)
    etag = f'"{row.sha256}"'
    if_none_match = request.headers.get("if-none-match")
    if if_none_match and (if_none_match.strip() == "*" or etag in [t.strip() for t in if_none_match.split(",")]):
        return Response(status_code=304, headers={"ETag": etag})
    return FileResponse(path, media_type="application/octet-stream", filename=name.rsplit("/", 1)[-1],
                        headers={"ETag": f'"{row.sha256}"', "X-Checksum-SHA256": row.sha256,
                                 "Cache-Control": "private, max-age=31536000, immutable"})


@router.get("/{job_id}/checkpoint.tar", summary="The whole checkpoint as one tar stream",
            response_class=StreamingResponse,
            responses={200: {"content": {"application/x-tar": {}}}, 409: {"description": "no checkpoint yet"}})
def download_checkpoint(job_id: str, key: CurrentKey, session: SessionDep, settings: SettingsDep):
    job = jobs_service.get(session, job_id, key)
    rows = repo.artifacts(session, job.id)
    if not rows:
        raise Conflict(f"job {job.id} ({job.type}, {job.status}) has no checkpoint to download",
                       code="no_artifacts")
    base = storage.job_dir(settings, job.id)
    members = []
    for a in rows:
        path = storage.safe_child(base, a.name)
        if path is None:
            raise NotFound(f"artifact {a.name!r} of job {job.id} is missing from the store", code="artifact_missing")
        _check_intact(settings, job.id, a, path)
        members.append((f"{job.id}/{a.name}", path))
    length = tar_size([(arc, p.stat().st_size) for arc, p in members])
    return StreamingResponse(stream_tar(members), media_type="application/x-tar",
                             headers={"Content-Length": str(length),
                                      "Content-Disposition": f'attachment; filename="{job.id}.tar"'})
