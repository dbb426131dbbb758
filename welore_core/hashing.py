"""SHA-256 of files, streamed, and a stamped variant that remembers verified files.
Torch-free, so the service can share it.

`stamped_sha256(path, cache_dir)` hashes a file once and records (size, mtime, inode, digest) in
`cache_dir/verified/`; later calls return the recorded digest while the file's stat is
unchanged. Like git's "racy clean" rule, a file modified within STAMP_SLACK_S seconds before its
stamp was taken is hashed again, since a write inside the same timestamp tick would not change
its mtime.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from .portable.integrity import file_sha256

__all__ = ["file_sha256", "stamped_sha256"]
STAMP_SLACK_S = 2.0


def _stamp_path(cache_dir: Path, path: Path) -> Path:
    return Path(cache_dir) / "verified" / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")


def stamped_sha256(path: str | Path, cache_dir: str | Path | None) -> str:
    path = Path(path).resolve()
    if cache_dir is None:
        return file_sha256(path)
    st = path.stat()
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
    stamp_file = _stamp_path(Path(cache_dir), path)
    try:
        stamp = json.loads(stamp_file.read_text())
        if ({k: stamp.get(k) for k in key} == key
                and st.st_mtime_ns < (stamp["checked_at"] - STAMP_SLACK_S) * 1e9):
            return stamp["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    checked_at = time.time()
    digest = file_sha256(path)
    try:
        stamp_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = stamp_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**key, "sha256": digest, "checked_at": checked_at}))
        os.replace(tmp, stamp_file)
    except OSError:
        pass  # a read-only cache only costs speed
    return digest
