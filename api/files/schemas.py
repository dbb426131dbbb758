"""Response bodies of the files API."""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel


class FileOut(BaseModel):
    id: str
    filename: str
    format: str
    size: int
    sha256: str
    records: int
    created_at: dt.datetime


class FileList(BaseModel):
    data: list[FileOut]
