"""Line-by-line validation of an uploaded dataset; the first bad line is reported by number.

A JSONL line must be one JSON object in a format the engine reads: `text` or `passage`
(a corpus), `prompt` + `completion`, BoolQ (`passage`, `question`, `answer`) or CommonsenseQA
(`question`, `answerKey`). A TXT file must be non-empty UTF-8.
"""

from __future__ import annotations

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


def validate_jsonl(path: Path) -> int:
    records = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
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


def validate_txt(path: Path) -> int:
    text = False
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _bad(lineno, f"not UTF-8 ({exc.reason} at byte {exc.start})") from exc
            text = text or bool(raw.strip())
    if not text:
        raise InvalidRequest("the file is empty", code="invalid_data")
    return 1


VALIDATORS = {"jsonl": validate_jsonl, "txt": validate_txt}
