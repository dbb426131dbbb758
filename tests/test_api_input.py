"""Unit checks of the API's input guards (no servers): lone surrogates in decoded JSON, every
route decoding JSON strictly, the upload validators' bounds and their line/byte positions."""

from __future__ import annotations

import io
import json
import random

import pytest


def test_lone_surrogate_finds_halves_of_pairs_at_any_depth_and_leaves_text_alone():
    from api.strictjson import lone_surrogate

    assert lone_surrogate(json.loads('{"a": ["ok", "\\ud83d\\ude00", {"é": "日本"}], "n": 1.5}')) is None
    assert lone_surrogate(json.loads('{"a": [1, {"b": "x\\ud800"}]}')) == (("a", 1, "b"), "x\ud800")
    assert lone_surrogate(json.loads('{"p": {"\\udfff": 1}}')) == (("p", "\udfff"), "\udfff")
    assert lone_surrogate(json.loads(b'["\xed\xa0\x80"]')) == ((0,), "\ud800")  # raw bytes: surrogatepass
    deep: list = ["\ud800"]
    for _ in range(100_000):
        deep = [deep]
    assert lone_surrogate(deep)[0] == (0,) * 100_001


def test_every_route_decodes_json_strictly():
    """A router created without StrictJsonRoute would let a surrogate through to the database."""
    from fastapi.routing import APIRoute

    from api.app import create_app
    from api.settings import Settings
    from api.strictjson import StrictJsonRoute

    def routes(items):
        for r in items:
            if hasattr(r, "original_router"):
                yield from routes(r.original_router.routes)
            else:
                yield r

    ours = [r for r in routes(create_app(Settings()).routes)
            if isinstance(r, APIRoute) and (r.path.startswith("/v1/") or r.path in ("/healthz", "/readyz"))]
    assert len(ours) > 15 and all(isinstance(r, StrictJsonRoute) for r in ours), \
        [r.path for r in ours if not isinstance(r, StrictJsonRoute)]


def test_jsonl_lines_up_to_the_limit_pass_and_longer_ones_are_refused_naming_it(tmp_path):
    from api.errors import InvalidRequest
    from api.files.validate import validate_jsonl

    limit = 64
    line = b'{"text": "' + b"a" * (limit - 12) + b'"}'  # limit - 0 bytes without its newline
    assert len(line) == limit
    f = tmp_path / "a.jsonl"
    for ok in (line + b"\n" + line + b"\n", line, b"\n" + line):
        f.write_bytes(ok)
        assert validate_jsonl(f, limit) in (1, 2)
    for lineno, bad in ((1, line[:-2] + b'a"}'), (2, line + b"\n" + line[:-2] + b'a"}\n'), (1, b" " * 10_000)):
        f.write_bytes(bad)
        with pytest.raises(InvalidRequest, match=f"line {lineno}: longer than the limit of {limit} bytes") as err:
            validate_jsonl(f, limit)
        assert err.value.extra["line"] == lineno and "WELORE_UPLOAD_MAX_LINE_BYTES" in err.value.message


def _txt_reference(data: bytes) -> str | None:
    """What the line-by-line check said before TXT files were read in blocks."""
    for lineno, raw in enumerate(io.BytesIO(data), 1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"line {lineno}: not UTF-8 ({exc.reason} at byte {exc.start})"
    return None


def test_txt_is_checked_in_blocks_reporting_the_line_and_byte_a_line_check_would(tmp_path):
    from api.errors import InvalidRequest
    from api.files.validate import validate_txt

    rng = random.Random(0)
    pieces = ["abc ", "é", "日本", "😀", "\n", "\n\n"]
    bad = [b"\xff", b"\xe6\x97", b"\xed\xa0\x80", b"\xc3", b"\xf0\x9f\x98"]
    f = tmp_path / "t.txt"
    checked = 0
    for case in range(300):
        data = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 60))).encode()
        if case % 3:
            at = rng.randint(0, len(data))
            data = data[:at] + rng.choice(bad) + data[at:]
        f.write_bytes(data)
        expected = _txt_reference(data)
        for block in (1, 2, 3, 7, 1 << 20):
            if expected is None and data.strip():
                assert validate_txt(f, block=block) == 1
            elif expected is None:
                with pytest.raises(InvalidRequest, match="the file is empty"):
                    validate_txt(f, block=block)
            else:
                with pytest.raises(InvalidRequest) as err:
                    validate_txt(f, block=block)
                assert err.value.message == expected, (data, block)
                checked += 1
    assert checked > 500
