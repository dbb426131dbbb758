"""POST /v1/files (a multipart upload, streamed with its size limit enforced while it arrives)
GET /v1/files (your uploads) and GET /v1/files/{id}."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ..deps import CurrentKey, DbDep, FileId, SettingsDep
from ..errors import PayloadTooLarge, responses
from ..strictjson import StrictJsonRoute
from . import service
from .receive import FIELD, receive
from .schemas import FileList, FileOut

router = APIRouter(prefix="/v1/files", tags=["files"], route_class=StrictJsonRoute)

UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": [FIELD],
    "properties": {FIELD: {"type": "string", "format": "binary", "description": "a .jsonl or .txt file"}}}}}}}


@router.post("", status_code=201, response_model=FileOut, openapi_extra=UPLOAD_BODY,
             summary="Upload a JSONL or TXT dataset (validated line by line)",
             responses=responses(400, 401, 413, 415, 422, 507))
async def upload_file(request: Request, key: CurrentKey, db: DbDep, settings: SettingsDep) -> FileOut:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > settings.upload_max_bytes + 64 * 1024:
        raise PayloadTooLarge(f"upload of {length} bytes exceeds the limit of {settings.upload_max_bytes} bytes "
                              "(WELORE_UPLOAD_MAX_BYTES)")
    got = await receive(settings, request.headers.get("content-type"), request.stream())
    row = await run_in_threadpool(service.store, db, settings, key, got)
    return FileOut.model_validate(row, from_attributes=True)


@router.get("", response_model=FileList, summary="Your uploaded files, newest first", responses=responses(401))
def list_files(key: CurrentKey, db: DbDep) -> FileList:
    with db() as s:
        return FileList(data=[FileOut.model_validate(f, from_attributes=True) for f in service.list_files(s, key)])


@router.get("/{file_id}", response_model=FileOut, summary="An uploaded file's metadata",
            responses=responses(401, 404, 422))
def get_file(file_id: FileId, key: CurrentKey, db: DbDep) -> FileOut:
    with db() as s:
        return FileOut.model_validate(service.get(s, file_id, key), from_attributes=True)
