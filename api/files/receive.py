"""Receive a multipart upload straight from the request stream into the artifact store's .tmp,
hashing and counting as it arrives: the size limit stops the upload as soon as it is passed
(chunked bodies too), and nothing is spooled anywhere else first. A full disk is a 507 and a
refused upload leaves nothing behind."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import AsyncIterator

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

from .. import storage
from ..errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from ..models import new_id

FIELD = "file"


@dataclass
class Received:
    file_id: str
    filename: str
    path: Path
    size: int
    sha256: str


def _filename(disposition: bytes) -> tuple[str, str | None]:
    _, params = parse_options_header(disposition)
    name = params.get(b"name", b"").decode("latin-1")
    raw = params.get(b"filename")
    if raw is None:
        return name, None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    text = "".join(c for c in text if ord(c) >= 32 and ord(c) != 127)  # no control characters
    return name, PurePath(text.replace("\\", "/")).name[:255]


async def receive(settings, content_type: str | None, chunks: AsyncIterator[bytes]) -> Received:
    """Stream the `file` field of a multipart/form-data body to .tmp; → what arrived."""
    ctype, params = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise UnsupportedMediaType(f"expected a multipart/form-data upload with a '{FIELD}' field, got "
                                   f"{(content_type or 'no content type')[:100]!r}")
    limit = settings.upload_max_bytes
    file_id = new_id("file")
    state = {"headers": {}, "field": b"", "value": b"", "in_file": False, "done": False, "filename": None,
             "size": 0}
    h = hashlib.sha256()
    out = None

    def on_header_field(data, start, end):
        state["field"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished():
        name, filename = _filename(state["headers"].get(b"content-disposition", b""))
        state["in_file"] = name == FIELD and not state["done"] and filename is not None
        if state["in_file"]:
            state["filename"] = filename
        state["headers"] = {}

    def on_part_data(data, start, end):
        if not state["in_file"]:
            return
        state["size"] += end - start
        if state["size"] > limit:
            raise PayloadTooLarge(f"the file is larger than the limit of {limit} bytes (WELORE_UPLOAD_MAX_BYTES)")
        block = data[start:end]
        h.update(block)
        out.write(block)

    def on_part_end():
        if state["in_file"]:
            state["done"], state["in_file"] = True, False

    try:
        parser = MultipartParser(params[b"boundary"], {
            "on_header_field": on_header_field, "on_header_value": on_header_value,
            "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data, "on_part_end": on_part_end})
    except FormParserError as exc:
        raise InvalidRequest(f"the multipart boundary is not usable ({str(exc)[:100]}); a boundary is 1 to 70 "
                             "characters (RFC 2046)", code="invalid_upload") from exc
    tmp = None
    try:
        with storage.refuse_when_full(settings, "the upload was not kept"):
            tmp = storage.tmp_dir(settings) / f"{file_id}.upload"
            out = open(tmp, "wb")
            try:
                async for chunk in chunks:
                    parser.write(chunk)
                parser.finalize()
            except MultipartParseError as exc:
                raise InvalidRequest(f"the multipart body is malformed ({str(exc)[:100]})",
                                     code="invalid_upload") from exc
            finally:
                out.close()
        if not state["done"]:
            raise InvalidRequest(f"no file in the upload: send it as the multipart field '{FIELD}' with a filename",
                                 code="invalid_upload")
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    return Received(file_id, state["filename"], tmp, state["size"], h.hexdigest())
