"""The integrity record of a checkpoint: SHA-256 and size of every weight file, kept in
welore.json under `files`, and the check of a directory against it.

Torch-free and standard-library only: it is copied into every factorised checkpoint beside
modeling_welore.py (which imports it), and the service imports it to check artifacts.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

META = "welore.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weight_files(directory: str | os.PathLike) -> list[str]:
    """Names of the weight files (and their shard index) directly inside `directory`."""
    d = Path(directory)
    return sorted(p.name for p in d.iterdir()
                  if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".index.json")))


def file_records(directory: str | os.PathLike) -> dict[str, dict]:
    """{file name: {"sha256", "size"}} for every weight file in `directory`."""
    d = Path(directory)
    return {name: {"sha256": file_sha256(d / name), "size": (d / name).stat().st_size}
            for name in weight_files(d)}


def check_file(path: str | os.PathLike, record: dict, hash_fn=file_sha256) -> str | None:
    """Why `path` does not match `record` (None when it does)."""
    path = Path(path)
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != record.get("size"):
        return f"{path} has {size} bytes; welore.json records {record.get('size')}"
    digest = hash_fn(path)
    if digest != record.get("sha256"):
        return (f"{path} has SHA-256 {digest[:16]}…; welore.json records {str(record.get('sha256'))[:16]}… "
                "(the file was changed or damaged after it was written)")
    return None


def check_directory(directory: str | os.PathLike, files: dict[str, dict], hash_fn=file_sha256) -> list[str]:
    """Every mismatch between the weight files in `directory` and the record `files`."""
    d = Path(directory)
    problems = [p for name, rec in sorted(files.items()) if (p := check_file(d / name, rec, hash_fn))]
    unrecorded = sorted(set(weight_files(d)) - set(files))
    problems += [f"{d / name} is not in welore.json's integrity record" for name in unrecorded]
    return problems


def read_record(directory: str | os.PathLike) -> dict | None:
    """welore.json of `directory` as a dict, or None when there is none."""
    path = Path(directory) / META
    if not path.is_file():
        return None
    return json.loads(path.read_text())
