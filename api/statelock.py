"""One embedded server per state directory: `welore serve` holds an exclusive lock on
`<state_dir>/serve.lock` (flock, released by the OS when the process ends, even on kill -9). A
second server on the same directory refuses to start before it touches the database or any job."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from welore_core.errors import InvalidArgument

_lock = threading.Lock()
_held: dict[str, object] = {}  # resolved state dir → its open lock file (kept for the process's life)


def acquire(state_dir: Path) -> None:
    """Lock `state_dir` for this process (a no-op when it already holds it)."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    key = str(state_dir.resolve())
    with _lock:
        if key in _held:
            return
        f = open(state_dir / "serve.lock", "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise InvalidArgument(
                f"another `welore serve` (pid {holder}) is using the state directory {state_dir}; "
                "stop it first, or give this server its own directory with WELORE_STATE_DIR") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        _held[key] = f
