"""The artifact store's layout (a local directory shared by API and workers):

  <artifact_dir>/jobs/<job id>/...        a job's output (a WeLore checkpoint), renamed into place
  <artifact_dir>/files/<file id>/<file id>.<jsonl|txt>   an uploaded dataset
  <artifact_dir>/.tmp/                    work in progress; same filesystem, so renames are atomic:
      <job id>.<random>/                  one attempt of a job (removed when the job ends, when a
                                          later attempt claims it, or by the reaper's sweep)
      <file id>.upload                    an upload being received
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from welore_core.hashing import file_sha256 as sha256_file
from welore_core.hashing import stamped_sha256

from .settings import Settings


def root(settings: Settings) -> Path:
    return Path(settings.artifacts)


def job_dir(settings: Settings, job_id: str) -> Path:
    return root(settings) / "jobs" / job_id


def file_path(settings: Settings, file_id: str, fmt: str) -> Path:
    return root(settings) / "files" / file_id / f"{file_id}.{fmt}"


def find_file(settings: Settings, file_id: str) -> Path | None:
    d = root(settings) / "files" / file_id
    found = sorted(d.glob(f"{file_id}.*")) if d.is_dir() else []
    return found[0] if found else None


def tmp_dir(settings: Settings) -> Path:
    d = root(settings) / ".tmp"
    d.mkdir(parents=True, exist_ok=True)
    return d


def safe_child(base: Path, name: str) -> Path | None:
    """`base/name` if it stays inside `base` and is a regular file; else None."""
    base = base.resolve()
    try:
        p = (base / name).resolve()
    except (OSError, ValueError):
        return None
    if not p.is_relative_to(base) or not p.is_file():
        return None
    return p


def writable(settings: Settings) -> bool:
    try:
        d = tmp_dir(settings)
        probe = d / f".probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
        return True
    except OSError:
        return False


def intact(settings: Settings, path: Path, size: int, sha256: str) -> bool:
    """Whether a stored artifact still has the size and SHA-256 recorded when its job finished
    (re-hashed only when the file's stat changed since it was last verified)."""
    try:
        return path.stat().st_size == size and stamped_sha256(path, Path(settings.cache_dir)) == sha256
    except OSError:
        return False


def remove_work_dirs(settings: Settings, job_id: str) -> int:
    """Delete what earlier attempts of `job_id` left in .tmp (call only while holding its claim)."""
    n = 0
    for p in tmp_dir(settings).glob(f"{job_id}.*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        n += 1
    return n


def sweep_tmp(settings: Settings, running_ids, upload_max_age_s: float = 3600.0) -> list[str]:
    """Delete work directories of jobs that are not running any more (their worker died before it
    cleaned up) and uploads older than `upload_max_age_s`; → the names removed. `running_ids()` is
    asked after the listing, so a directory made after a claim is never taken for a dead one's."""
    entries = list(tmp_dir(settings).iterdir())
    if not entries:
        return []
    running = running_ids()
    removed = []
    now = time.time()
    for p in entries:
        name = p.name
        if name.startswith("job_") and "." in name and name.split(".", 1)[0] not in running:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(name)
        elif name.endswith(".upload"):
            try:
                if now - p.stat().st_mtime > upload_max_age_s:
                    p.unlink(missing_ok=True)
                    removed.append(name)
            except OSError:
                pass
    return removed
