"""POST /v1/files (multipart upload), GET /v1/files (your uploads) and GET /v1/files/{id}."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request, UploadFile
from fastapi import File as FileField

from ..deps import CurrentKey, SessionDep, SettingsDep
from ..errors import PayloadTooLarge
from . import service
from .schemas import FileList, FileOut

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("", status_code=201, response_model=FileOut,
             summary="Upload a JSONL or TXT dataset (validated line by line)")
def upload_file(request: Request, key: CurrentKey, session: SessionDep, settings: SettingsDep,
                file: Annotated[UploadFile, FileField(description="a .jsonl or .txt file")]) -> FileOut:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > settings.upload_max_bytes + 64 * 1024:
        raise PayloadTooLarge(f"upload of {length} bytes exceeds the limit of {settings.upload_max_bytes} bytes")
    row = service.upload(session, settings, key, file.filename or "", file.file)
    return FileOut.model_validate(row, from_attributes=True)


@router.get("", response_model=FileList, summary="Your uploaded files, newest first")
def list_files(key: CurrentKey, session: SessionDep) -> FileList:
    return FileList(data=[FileOut.model_validate(f, from_attributes=True) for f in service.list_files(session, key)])


@router.get("/{file_id}", response_model=FileOut, summary="An uploaded file's metadata")
def get_file(file_id: str, key: CurrentKey, session: SessionDep) -> FileOut:
    return FileOut.model_validate(service.get(session, file_id, key), from_attributes=True)
