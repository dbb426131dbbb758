"""Stream files as an uncompressed tar with a Content-Length known in advance, reading each
file in chunks (a multi-GB checkpoint never sits in memory).

Each member is a GNU header (one 512-byte block for names under 100 bytes, which ours are),
then its data padded to 512 bytes; two zero blocks end the archive, padded to 20 blocks like
`tarfile` does, so any tar reader accepts it. Every member is verified as it is read (verify.py).
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Iterator

from .verify import Check

BLOCK, RECORD = 512, 512 * 20


def _header(arcname: str, size: int, mtime: int) -> bytes:
    info = tarfile.TarInfo(arcname)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    return info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="strict")


def tar_size(members: list[tuple[str, int]]) -> int:
    """Bytes of the archive for [(arcname, size)]."""
    total = sum(len(_header(name, size, 0)) + -(-size // BLOCK) * BLOCK for name, size in members)
    total += 2 * BLOCK
    return -(-total // RECORD) * RECORD


def stream_tar(members: list[tuple[str, Path, Check]], chunk: int = 1 << 20) -> Iterator[bytes]:
    """Yield the archive of [(arcname, path, check)]: each member's bytes go through its `check`,
    and its last block is yielded only once the check has passed (else ArtifactCorrupt is raised)."""
    written = 0
    for arcname, path, check in members:
        size = check.st.st_size
        head = _header(arcname, size, int(check.st.st_mtime))
        yield head
        written += len(head)
        left = size
        with open(path, "rb") as f:
            while left > 0:
                block = f.read(min(chunk, left))
                if not block:
                    raise OSError(f"{path} shrank while it was being sent")
                left -= len(block)
                written += len(block)
                check.update(block)
                if left == 0:
                    check.verify()
                yield block
        if size == 0:
            check.verify()
        pad = -size % BLOCK
        if pad:
            yield b"\0" * pad
            written += pad
    end = 2 * BLOCK
    end += -(written + end) % RECORD
    yield b"\0" * end
