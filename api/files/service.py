"""Storing a received upload (validated line by line, then moved into the artifact store and
recorded) and looking datasets up."""

from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePath

from sqlalchemy import select
from sqlalchemy.orm import Session

from .. import storage
from ..errors import InvalidRequest, NotFound
from ..models import ApiKey, File
from ..settings import Settings
from .receive import Received
from .validate import validate

FORMATS = {".jsonl": "jsonl", ".txt": "txt"}


def get(session: Session, file_id: str, owner: ApiKey) -> File:
    row = session.scalar(select(File).where(File.id == file_id, File.owner_id == owner.id))
    if row is None:
        raise NotFound(f"file {file_id!r} not found", code="file_not_found")
    return row


def store(db, settings: Settings, owner: ApiKey, got: Received) -> File:
    """Validate `got`, move it into place and record it; nothing is kept when it is refused."""
    final = None
    try:
        fmt = FORMATS.get(PurePath(got.filename).suffix.lower())
        if fmt is None:
            raise InvalidRequest(f"file {got.filename!r}: expected a .jsonl or .txt file", code="invalid_file_type")
        records = validate(fmt, got.path, settings.upload_max_line_bytes)
        final = storage.file_path(settings, got.file_id, fmt)
        with storage.refuse_when_full(settings, "the upload was not kept"):
            final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(got.path, final)
        row = File(id=got.file_id, owner_id=owner.id, filename=got.filename, format=fmt, size=got.size,
                   sha256=got.sha256, records=records)
        with db() as session:
            session.add(row)
        return row
    except BaseException:
        if final is not None:
            shutil.rmtree(final.parent, ignore_errors=True)
        raise
    finally:
        Path(got.path).unlink(missing_ok=True)


def list_files(session: Session, owner: ApiKey, limit: int = 500) -> list[File]:
    """The caller's uploads, newest first."""
    q = select(File).where(File.owner_id == owner.id).order_by(File.created_at.desc(), File.id.desc()).limit(limit)
    return list(session.scalars(q))
