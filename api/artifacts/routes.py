"""GET/HEAD /v1/jobs/{id}/artifacts, .../artifacts/{name} (ETag, HTTP Range) and .../checkpoint.tar;
POST /v1/jobs/{id}/links and GET /v1/links/{token}: signed, expiring download links for browsers.

Only names recorded for the job can be fetched, and each must resolve inside the job's
directory: any other path is refused with 404. `If-None-Match` compares weakly (`W/"…"` matches);
a `Range` header that is not a valid byte range is ignored (200 with the whole file, as RFC 9110
says); a valid one outside the file is 416. Every file is checked against the size and SHA-256
recorded when the job finished before it is served; a damaged one is refused with 409
`artifact_corrupt` naming it (never served as if it were fine), and whatever is sent whole is
hashed as it goes (verify.py): damage that kept the file's size and times cuts the transfer.
"""

from __future__ import annotations

import datetime as dt
import re

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, Field

from .. import storage
from ..auth import links
from ..deps import CurrentKey, DbDep, JobId, SettingsDep
from ..errors import Conflict, NotFound, RangeNotSatisfiable, responses
from ..jobs import repository as repo
from ..jobs import service as jobs_service
from ..strictjson import StrictJsonRoute
from .tarstream import stream_tar, tar_size
from .verify import Check, VerifiedFileResponse, VerifiedStreamingResponse

router = APIRouter(prefix="/v1/jobs", tags=["artifacts"], route_class=StrictJsonRoute)
links_router = APIRouter(prefix="/v1/links", tags=["artifacts"], route_class=StrictJsonRoute)

_RANGE = re.compile(r"^bytes=(\d{0,19})-(\d{0,19})$")


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


@router.get("/{job_id}/artifacts", response_model=ArtifactList, summary="A job's files with size and SHA-256",
            responses=responses(401, 404, 422))
def list_artifacts(job_id: JobId, key: CurrentKey, db: DbDep) -> ArtifactList:
    with db() as s:
        job = jobs_service.get(s, job_id, key)
        rows = repo.artifacts(s, job.id)
    return ArtifactList(job_id=job.id, data=[ArtifactOut(name=a.name, size=a.size, sha256=a.sha256,
                                                         url=f"/v1/jobs/{job.id}/artifacts/{a.name}") for a in rows],
                        checkpoint_url=f"/v1/jobs/{job.id}/checkpoint.tar" if rows else None)


def _etag_matches(header: str, etag: str) -> bool:
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or etag in [t[2:] if t.startswith("W/") else t for t in tags]


def _check_range(request: Request, size: int) -> None:
    """Drop a malformed Range header (→ 200 with everything); 416 for a valid one outside the file."""
    value = request.headers.get("range")
    if value is None:
        return
    m = _RANGE.match(value.strip().replace(" ", ""))
    if m is None or (m.group(1) == "" and m.group(2) == "") or (
            m.group(1) and m.group(2) and int(m.group(1)) > int(m.group(2))):
        request.scope["headers"] = [(k, v) for k, v in request.scope["headers"] if k.lower() != b"range"]
        return
    start, end = m.groups()
    if (start and int(start) >= size) or (not start and int(end) == 0):
        raise RangeNotSatisfiable(f"range {value!r} is outside the file of {size} bytes", size=size)


_DOWNLOAD = dict(response_class=FileResponse,
                 responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                      "format": "binary"}}}},
                            206: {"description": "a byte range",
                                  "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                      "format": "binary"}}}},
                            304: {"description": "not modified (If-None-Match matched the ETag)"},
                            **responses(401, 404, 409, 416, 422)})


@router.head("/{job_id}/artifacts/{name:path}", summary="One file's headers (size, ETag) without its body",
             operation_id="head_artifact", **_DOWNLOAD)
@router.get("/{job_id}/artifacts/{name:path}", summary="Download one file (supports Range and If-None-Match)",
            operation_id="download_artifact", **_DOWNLOAD)
def download_artifact(job_id: JobId, name: str, request: Request, key: CurrentKey, db: DbDep, settings: SettingsDep):
    return _file_response(request, db, settings, key, job_id, name)


class LinkCreate(BaseModel):
    name: str = Field(min_length=1, max_length=1000, description="the artifact's name, as listed")


class LinkOut(BaseModel):
    url: str = Field(description="GET it without an Authorization header; it honours Range like the artifact URL")
    expires_at: dt.datetime


@router.post("/{job_id}/links", status_code=201, response_model=LinkOut,
             summary="A signed download link of one artifact, valid 10 minutes (for browsers)",
             responses=responses(401, 404, 422))
def create_link(job_id: JobId, body: LinkCreate, key: CurrentKey, db: DbDep) -> LinkOut:
    with db() as s:
        job = jobs_service.get(s, job_id, key)
        if repo.artifact(s, job.id, body.name) is None:
            raise NotFound(f"job {job.id} has no artifact {body.name!r}", code="artifact_not_found")
    token, exp = links.make_token(key, job.id, body.name)
    return LinkOut(url=f"/v1/links/{token}", expires_at=dt.datetime.fromtimestamp(exp, dt.timezone.utc))


@links_router.get("/{token}", summary="Download through a signed link (no Authorization header)",
                  operation_id="follow_link", **_DOWNLOAD)
def follow_link(token: str, request: Request, db: DbDep, settings: SettingsDep):
    with db() as s:
        found = links.verify_token(s, token)
        if found is not None:
            s.expunge(found[0])
    if found is None:
        raise NotFound("this download link is invalid or has expired (links last 10 minutes); ask for a new "
                       "one with POST /v1/jobs/{id}/links", code="link_invalid")
    return _file_response(request, db, settings, found[0], found[1], found[2])


def _file_response(request: Request, db, settings, key, job_id: str, name: str):
    if not name or len(name) > 255 or any(ord(c) < 32 for c in name):
        raise NotFound(f"job {job_id} has no artifact {name[:80]!r}", code="artifact_not_found")
    with db() as s:
        job = jobs_service.get(s, job_id, key)
        row = repo.artifact(s, job.id, name)
    path = storage.safe_child(storage.job_dir(settings, job.id), name) if row is not None else None
    if row is None or path is None:
        raise NotFound(f"job {job.id} has no artifact {name!r}", code="artifact_not_found")
    _check_intact(settings, job.id, row, path)
    etag = f'"{row.sha256}"'
    headers = {"ETag": etag, "X-Checksum-SHA256": row.sha256, "Cache-Control": "private, max-age=31536000, immutable"}
    if_none_match = request.headers.get("if-none-match")
    if if_none_match and _etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    _check_range(request, row.size)
    check = Check(settings, path, row.sha256, f"artifact {name!r} of job {job.id}")
    return VerifiedFileResponse(path, check, media_type="application/octet-stream",
                                filename=name.rsplit("/", 1)[-1], headers=headers)


@router.get("/{job_id}/checkpoint.tar", summary="The whole checkpoint as one tar stream",
            response_class=StreamingResponse,
            responses={200: {"content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}}},
                       **responses(401, 404, 409, 422)})
def download_checkpoint(job_id: JobId, key: CurrentKey, db: DbDep, settings: SettingsDep):
    with db() as s:
        job = jobs_service.get(s, job_id, key)
        rows = repo.artifacts(s, job.id)
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
        members.append((f"{job.id}/{a.name}", path, Check(settings, path, a.sha256,
                                                          f"artifact {a.name!r} of job {job.id}")))
    length = tar_size([(arc, check.st.st_size) for arc, _, check in members])
    return VerifiedStreamingResponse(stream_tar(members), media_type="application/x-tar",
                                     headers={"Content-Length": str(length),
                                              "Content-Disposition": f'attachment; filename="{job.id}.tar"'})
