"""SHA-256 of files, streamed, and a stamped variant that remembers verified files.
Torch-free, so the service can share it.

`stamped_sha256(path, cache_dir)` hashes a file once and records (size, mtime, inode, digest) in
`cache_dir/verified/`; later calls return the recorded digest while the file's stat is
unchanged (and, given `max_age_s`, while the record is younger than that: a change that keeps
the stat, such as bit rot, is then found at the next check after it). Like git's "racy clean"
rule, a file modified within STAMP_SLACK_S seconds before its stamp was taken is hashed again,
since a write inside the same timestamp tick would not change its mtime. `record_sha256` stores
a digest computed elsewhere (e.g. while the file was being sent).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

from .portable.integrity import file_sha256

__all__ = ["file_sha256", "record_sha256", "stamped_sha256"]
STAMP_SLACK_S = 2.0


def _stamp_path(cache_dir: Path, path: Path) -> Path:
    return Path(cache_dir) / "verified" / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")


def _key(st: os.stat_result) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def stamped_sha256(path: str | Path, cache_dir: str | Path | None, max_age_s: float | None = None) -> str:
    path = Path(path).resolve()
    if cache_dir is None:
        return file_sha256(path)
    st = path.stat()
    key = _key(st)
    try:
        stamp = json.loads(_stamp_path(Path(cache_dir), path).read_text())
        if ({k: stamp.get(k) for k in key} == key
                and st.st_mtime_ns < (stamp["checked_at"] - STAMP_SLACK_S) * 1e9
                and (max_age_s is None or time.time() - stamp["checked_at"] < max_age_s)):
            return stamp["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    checked_at = time.time()
    digest = file_sha256(path)
    record_sha256(path, cache_dir, digest, st, checked_at)
    return digest


def record_sha256(path: str | Path, cache_dir: str | Path, digest: str, st: os.stat_result,
                  checked_at: float) -> None:
    """Record that `path`, whose stat was `st` when reading it began at `checked_at`, hashed to `digest`."""
    path = Path(path).resolve()
    stamp_file = _stamp_path(Path(cache_dir), path)
    try:
        stamp_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = stamp_file.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({**_key(st), "sha256": digest, "checked_at": checked_at}))
        os.replace(tmp, stamp_file)
    except OSError:
        pass  # a read-only (or full) cache only costs speed
