"""Line-by-line validation of an uploaded dataset; the first bad line is reported by number.

A JSONL line must be one JSON object in a format the engine reads: `text` or `passage`
(a corpus), `prompt` + `completion`, BoolQ (`passage`, `question`, `answer`) or CommonsenseQA
(`question`, `answerKey`). A TXT file must be non-empty UTF-8.

Memory stays bounded whatever the file holds: a JSONL line longer than WELORE_UPLOAD_MAX_LINE_BYTES
is refused (422 naming the limit) without being read whole, and a TXT file is checked in blocks.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path

from ..errors import InvalidRequest


def _bad(line: int, why: str) -> InvalidRequest:
    return InvalidRequest(f"line {line}: {why}", code="invalid_data", line=line)


def _usable(obj: dict) -> bool:
    if any(isinstance(obj.get(f), str) and obj[f].strip() for f in ("text", "passage")):
        return True
    if isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
        return True
    return "question" in obj and "answerKey" in obj


def _lines(f, max_line_bytes: int):
    """(line number, line) of a binary file, reading at most `max_line_bytes` + 1 bytes at a time, so
    a longer line is refused (naming the limit) before it is held whole."""
    lineno = 0
    while raw := f.readline(max_line_bytes + 1):
        lineno += 1
        if len(raw) > max_line_bytes and not (len(raw) == max_line_bytes + 1 and raw.endswith(b"\n")):
            raise _bad(lineno, f"longer than the limit of {max_line_bytes} bytes per line "
                               "(WELORE_UPLOAD_MAX_LINE_BYTES); split long texts into several records, one "
                               "JSON object per line")
        yield lineno, raw


def validate_jsonl(path: Path, max_line_bytes: int) -> int:
    records = 0
    with open(path, "rb") as f:
        for lineno, raw in _lines(f, max_line_bytes):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _bad(lineno, f"not UTF-8 ({exc.reason} at byte {exc.start})") from exc
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _bad(lineno, f"not valid JSON ({exc.msg} at column {exc.colno}); each line must be "
                                   "one JSON object") from exc
            except (ValueError, RecursionError) as exc:  # a huge integer, or nesting too deep to parse
                raise _bad(lineno, "JSON this server does not read (an integer of more than 4300 digits, or "
                                   "objects nested too deeply); each line must be one flat-ish JSON object") from exc
            if not isinstance(obj, dict):
                raise _bad(lineno, f"expected a JSON object, got {type(obj).__name__}")
            if not _usable(obj):
                raise _bad(lineno, f"no usable fields (found {sorted(obj)[:10]}); expected a string 'text' "
                                   "or 'passage', 'prompt' + 'completion', or CommonsenseQA 'question' + "
                                   "'answerKey'")
            records += 1
    if records == 0:
        raise InvalidRequest("the file holds no records (every line is blank)", code="invalid_data")
    return records


def validate_txt(path: Path, block: int = 1 << 20) -> int:
    """UTF-8 checked block by block (a text file's lines may be any length): the first bad byte is
    reported by its line and its byte within that line."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    text = False
    lines_before, line_start, offset = 0, 0, 0  # newlines before `offset`; where the current line starts
    with open(path, "rb") as f:
        while True:
            chunk = f.read(block)
            pending = len(decoder.getstate()[0])  # bytes of a sequence the previous block cut
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                at = offset - pending + exc.start  # the bad byte's offset in the file
                seen = chunk[:max(0, at - offset)]
                lineno = lines_before + seen.count(b"\n") + 1
                start = offset + seen.rindex(b"\n") + 1 if b"\n" in seen else line_start
                raise _bad(lineno, f"not UTF-8 ({exc.reason} at byte {at - start})") from exc
            if not chunk:
                break
            text = text or bool(chunk.strip())
            if b"\n" in chunk:
                lines_before += chunk.count(b"\n")
                line_start = offset + chunk.rindex(b"\n") + 1
            offset += len(chunk)
    if not text:
        raise InvalidRequest("the file is empty", code="invalid_data")
    return 1


def validate(fmt: str, path: Path, max_line_bytes: int) -> int:
    """→ the records of an uploaded file in format `fmt` (a text file counts as one)."""
    return validate_jsonl(path, max_line_bytes) if fmt == "jsonl" else validate_txt(path)
