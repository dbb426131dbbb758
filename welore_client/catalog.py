"""`client.files` (uploaded datasets) and `client.models` (what can be named as a job's model)."""

from __future__ import annotations

from pathlib import Path

from ._transport import Transport
from .types import Dataset, File, Model


class Files:
    def __init__(self, transport: Transport):
        self._t = transport

    def upload(self, path: str | Path) -> File:
        """Upload a .jsonl or .txt dataset; the server validates it line by line (422 names the
        first bad line). Sent once: an upload is not retried."""
        p = Path(path)
        with open(p, "rb") as f:
            return File.model_validate(self._t.json("POST", "/v1/files", files={"file": (p.name, f)}, retry=False))

    def get(self, file_id: str) -> File:
        return File.model_validate(self._t.json("GET", f"/v1/files/{file_id}"))

    def list(self) -> list[File]:
        return [File.model_validate(f) for f in self._t.json("GET", "/v1/files")["data"]]

    def datasets(self) -> list[Dataset]:
        """Built-in dataset names and your uploads: what `data` / `calibration` params accept."""
        return [Dataset.model_validate(d) for d in self._t.json("GET", "/v1/datasets")["data"]]


class Models:
    def __init__(self, transport: Transport):
        self._t = transport

    def list(self) -> list[Model]:
        return [Model.model_validate(m) for m in self._t.json("GET", "/v1/models")["data"]]
