"""Serving an artifact verifies it: the bytes of a whole-file download (and of every member of
checkpoint.tar) are hashed as they are read for sending, and the last chunk is held back until
the digest is known. On a mismatch that chunk is never sent and the transfer is cut, so the
client sees a broken download, never a complete one with bad bytes; the result is recorded, so
every later request for the file is a 409 `artifact_corrupt`; one line is logged.

Byte ranges and HEAD rely on the recorded check (api/storage.py `intact`), which a whole-file
download refreshes and which expires after WELORE_ARTIFACT_VERIFY_MAX_AGE_S.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import anyio.to_thread
from fastapi.responses import FileResponse, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from .. import storage

log = logging.getLogger("welore.api.artifacts")
CHUNK = 1 << 20


class ArtifactCorrupt(Exception):
    """The bytes read for sending do not hash to the recorded SHA-256 (the transfer is cut)."""


class Check:
    """The SHA-256 of one stored file as it is read for sending, against the recorded one."""

    def __init__(self, settings, path: Path, sha256: str, label: str):
        self.settings, self.path, self.expected, self.label = settings, path, sha256, label
        self.st, self.started = path.stat(), time.time()
        self._h = hashlib.sha256()

    def update(self, block: bytes) -> None:
        self._h.update(block)

    def verify(self) -> None:
        """Record the result; raise ArtifactCorrupt on a mismatch."""
        digest = self._h.hexdigest()
        storage.record_check(self.settings, self.path, digest, self.st, self.started)
        if digest != self.expected:
            log.error("%s does not match the SHA-256 recorded when its job finished (read %s…, recorded %s…): "
                      "transfer cut, later requests are refused with 409 artifact_corrupt",
                      self.label, digest[:12], self.expected[:12])
            raise ArtifactCorrupt(self.label)


async def _cut_on_corrupt(serve) -> None:
    try:
        await serve()
    except ArtifactCorrupt:
        # Return without completing the response: the server closes the connection, and the client,
        # short of Content-Length, sees the transfer fail.
        return


class VerifiedFileResponse(FileResponse):
    """A FileResponse whose whole-file (200) body is verified while it is sent; 206 ranges, HEAD
    and 304 pass through as FileResponse sends them."""

    chunk_size = CHUNK

    def __init__(self, path: Path, check: Check, **kwargs):
        super().__init__(path, stat_result=check.st, **kwargs)
        self.check = check

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method", "GET").upper() != "GET":
            return await super().__call__(scope, receive, send)
        # No `http.response.pathsend`: the server would send the file without us reading it.
        scope = {**scope, "extensions": {k: v for k, v in scope.get("extensions", {}).items()
                                         if k != "http.response.pathsend"}}
        verifying, held = False, None

        async def hashing_send(message: Message) -> None:
            nonlocal verifying, held
            if message["type"] == "http.response.start":
                verifying = message["status"] == 200
                return await send(message)
            if not verifying or message["type"] != "http.response.body":
                return await send(message)
            await anyio.to_thread.run_sync(self.check.update, message.get("body", b""))
            if message.get("more_body", False):
                if held is not None:
                    await send(held)
                held = message  # sent once the next chunk shows this is not the last one
                return
            self.check.verify()
            if held is not None:
                await send(held)
            await send(message)

        await _cut_on_corrupt(lambda: super(VerifiedFileResponse, self).__call__(scope, receive, hashing_send))


class VerifiedStreamingResponse(StreamingResponse):
    """A StreamingResponse whose body iterator may raise ArtifactCorrupt: the transfer is then cut."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _cut_on_corrupt(lambda: super(VerifiedStreamingResponse, self).__call__(scope, receive, send))
