"""Download a job's artifacts: resume partial files with HTTP Range, verify every SHA-256, and
make each file appear under its name only once complete and verified (atomic rename).

A partial download is kept beside its destination as `<name>.part`; the next call continues it
with `Range: bytes=<size>-` and `If-Range: <the artifact's ETag>` (so a changed file restarts
from zero). A part whose full SHA-256 does not match is deleted and fetched once more from zero.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path, PurePosixPath

from . import errors
from ._transport import TRANSIENT_EXCEPTIONS, Transport
from .types import Artifact, Downloaded

CHUNK = 1 << 20


class _Transient(Exception):
    """A 502/503/504 in the middle of a download: retried like a broken connection."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def destination(root: Path, name: str) -> Path:
    """root/name, refusing names that would leave `root` (absolute, `..`)."""
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or any(p in ("..", "") for p in parts) or "\\" in name:
        raise errors.WeloreClientError(f"artifact name {name!r} is not a relative path inside the job; "
                                       "refusing to write it")
    return root.joinpath(*parts)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fetch(transport: Transport, art: Artifact, part: Path) -> int:
    """Bring `part` to the artifact's full size; → the offset of the last resumed request (0: none)."""
    resumed_from, attempt = 0, 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if have > art.size:
            part.unlink()
            have = 0
        if have == art.size:
            return resumed_from
        headers = {"Range": f"bytes={have}-", "If-Range": f'"{art.sha256}"'} if have else {}
        try:
            with transport.http.stream("GET", art.url, headers=headers) as r:
                if r.status_code == 416:
                    part.unlink(missing_ok=True)
                    continue
                if r.status_code in (502, 503, 504):
                    raise _Transient(f"HTTP {r.status_code}")
                transport.raise_for_error(r)
                if r.status_code == 206:
                    start = r.headers.get("content-range", "").removeprefix("bytes ").split("-")[0]
                    if start != str(have):
                        raise errors.WeloreClientError(f"asked for bytes from {have} of {art.name}, the server "
                                                       f"sent {r.headers.get('content-range')!r}")
                    mode, resumed_from = "ab", have
                else:  # 200: the whole file (the server ignored the range, or the file changed)
                    mode, resumed_from = "wb", 0
                with open(part, mode) as out:
                    try:
                        for block in r.iter_bytes(CHUNK):
                            out.write(block)
                    finally:  # keep what arrived: the next attempt resumes from it
                        out.flush()
                        os.fsync(out.fileno())
            attempt = 0
        except (*TRANSIENT_EXCEPTIONS, _Transient) as exc:
            if attempt >= transport.max_retries:
                raise errors.APIConnectionError(f"downloading {art.name} failed after {attempt + 1} attempt(s): "
                                                f"{exc}; run the download again to resume from "
                                                f"{part.stat().st_size if part.exists() else 0} bytes") from exc
            time.sleep(transport.delay(attempt))
            attempt += 1


def download_artifact(transport: Transport, art: Artifact, root: Path) -> Downloaded:
    dest = destination(root, art.name)
    if dest.is_file() and dest.stat().st_size == art.size and sha256_file(dest) == art.sha256:
        return Downloaded(name=art.name, path=dest, size=art.size, sha256=art.sha256, skipped=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    resumed_from = _fetch(transport, art, part)
    digest = sha256_file(part)
    if digest != art.sha256 and resumed_from:
        part.unlink()  # the kept prefix was not the file's: fetch it whole once more
        resumed_from = _fetch(transport, art, part)
        digest = sha256_file(part)
    if digest != art.sha256:
        part.unlink()
        raise errors.ChecksumMismatch(f"{art.name}: SHA-256 {digest} differs from the server's {art.sha256} "
                                      f"({art.size} bytes expected); nothing was kept, download it again")
    os.replace(part, dest)
    _fsync_dir(dest.parent)
    return Downloaded(name=art.name, path=dest, size=art.size, sha256=art.sha256, resumed_from=resumed_from)
