"""Upload (streamed to the artifact store, size-limited, validated) and lookup of datasets."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path, PurePath

from sqlalchemy import select
from sqlalchemy.orm import Session

from .. import storage
from ..errors import InvalidRequest, NotFound, PayloadTooLarge
from ..models import ApiKey, File, new_id
from ..settings import Settings
from .validate import VALIDATORS

FORMATS = {".jsonl": "jsonl", ".txt": "txt"}
CHUNK = 1 << 20


def get(session: Session, file_id: str, owner: ApiKey) -> File:
    row = session.scalar(select(File).where(File.id == file_id, File.owner_id == owner.id))
    if row is None:
        raise NotFound(f"file {file_id!r} not found", code="file_not_found")
    return row


def list_files(session: Session, owner: ApiKey, limit: int = 500) -> list[File]:
    """The caller's uploads, newest first."""
    q = select(File).where(File.owner_id == owner.id).order_by(File.created_at.desc(), File.id.desc()).limit(limit)
    return list(session.scalars(q))


def upload(session: Session, settings: Settings, owner: ApiKey, filename: str, stream) -> File:
    """`stream` has .read(n). Refuses over-size files without keeping anything."""
    name = PurePath(filename or "").name
    fmt = FORMATS.get(PurePath(name).suffix.lower())
    if fmt is None:
        raise InvalidRequest(f"file {name!r}: expected a .jsonl or .txt file", code="invalid_file_type")
    file_id = new_id("file")
    tmp = storage.tmp_dir(settings) / f"{file_id}.upload"
    h, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as out:
            while block := stream.read(CHUNK):
                size += len(block)
                if size > settings.upload_max_bytes:
                    raise PayloadTooLarge(f"file is larger than the limit of {settings.upload_max_bytes} bytes "
                                          "(WELORE_UPLOAD_MAX_BYTES)")
                h.update(block)
                out.write(block)
        records = VALIDATORS[fmt](tmp)
        final = storage.file_path(settings, file_id, fmt)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
    finally:
        Path(tmp).unlink(missing_ok=True)
    row = File(id=file_id, owner_id=owner.id, filename=name[:255], format=fmt, size=size,
               sha256=h.hexdigest(), records=records)
    session.add(row)
    try:
        session.commit()
    except BaseException:
        shutil.rmtree(final.parent, ignore_errors=True)
        raise
    return row
