"""The artifact store's layout (a local directory shared by API and workers):

  <artifact_dir>/jobs/<job id>/...        a job's output (a WeLore checkpoint), renamed into place
  <artifact_dir>/files/<file id>/<file id>.<jsonl|txt>   an uploaded dataset
  <artifact_dir>/.tmp/                    work in progress; same filesystem, so renames are atomic:
      <job id>.<random>/                  one attempt of a job (removed when the job ends, when a
                                          later attempt claims it, or by the reaper's sweep)
      <file id>.upload                    an upload being received
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from welore_core.hashing import file_sha256 as sha256_file
from welore_core.hashing import record_sha256, stamped_sha256

from .errors import InsufficientStorage
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


def free_bytes(settings: Settings) -> int:
    return shutil.disk_usage(tmp_dir(settings)).free


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def refuse_when_full(settings: Settings, what: str) -> Iterator[None]:
    """A full disk (ENOSPC, EDQUOT) inside the block becomes a 507 `disk_full` saying `what` was lost."""
    try:
        yield
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        try:
            free = f"{free_bytes(settings) / 2**20:.1f} MiB free"
        except OSError:
            free = "no space left"
        raise InsufficientStorage(f"the artifact store (WELORE_ARTIFACT_DIR) is full ({free}): {what}; free space "
                                  "there (outputs of jobs and uploads you no longer need) and retry") from exc


def intact(settings: Settings, path: Path, size: int, sha256: str) -> bool:
    """Whether a stored artifact still has the size and SHA-256 recorded when its job finished
    (re-hashed when the file's stat changed since it was last verified, or that check is older
    than WELORE_ARTIFACT_VERIFY_MAX_AGE_S)."""
    try:
        return path.stat().st_size == size and stamped_sha256(path, Path(settings.cache_dir),
                                                              settings.artifact_verify_max_age_s) == sha256
    except OSError:
        return False


def record_check(settings: Settings, path: Path, digest: str, st: os.stat_result, started: float) -> None:
    """Record what `path` (stat `st` when reading began at `started`) hashed to while it was served,
    so that a mismatch found then is refused (409) by every later request."""
    record_sha256(path, Path(settings.cache_dir), digest, st, started)


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
