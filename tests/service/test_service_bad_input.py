"""Malformed input of every kind against the production server over real HTTP: each answer is a
4xx with the `{"error": {code, message}}` body, never a 500, and no answer carries SQL or a
server path. The classes: NUL bytes in ids, cursors, artifact, model and data names; NaN,
Infinity and 1e400 in params; strings for numbers; bodies that are not JSON or not declared as
JSON; deeply nested JSON and 5000-digit integers (requests and uploads); bad uploads (no file
field, not multipart, over the limit when chunked or declared); bad Last-Event-ID, Range and
Idempotency-Key headers; out-of-range queries."""

from __future__ import annotations

import httpx
import pytest

from procs import ApiServer

pytestmark = pytest.mark.service

LEAKS = ("select ", "insert ", "update jobs", "sqlalchemy", "psycopg", "traceback", "/tmp/", "/work/", "/root/")


@pytest.fixture(scope="module")
def server(settings, tmp_path_factory):
    idle = settings.model_copy(update={"queue_prefix": settings.queue_prefix + "_bad"})
    api = ApiServer(idle, tmp_path_factory.mktemp("bad-input"))
    try:
        yield api, idle
    finally:
        api.stop()


def _check(r: httpx.Response, case: str, allowed=range(400, 500)) -> None:
    assert r.status_code in allowed, (case, r.status_code, r.text[:300])
    if r.request.method == "HEAD" or r.status_code < 300:
        return
    assert r.headers.get("content-type", "").startswith("application/json"), (case, r.status_code, r.text[:300])
    body = r.json()
    assert isinstance(body["error"]["code"], str) and isinstance(body["error"]["message"], str), (case, body)
    text = r.text.lower()
    for leak in LEAKS:
        assert leak not in text, (case, leak, r.text[:300])


def _post_raw(c, path: str, raw: bytes, h: dict, ctype="application/json") -> httpx.Response:
    return c.post(path, content=raw, headers={**h, "Content-Type": ctype})


def test_every_malformed_input_is_a_4xx_with_an_error_body(server, keys, settings):
    api, idle = server
    h = keys["A"]
    with httpx.Client(base_url=api.url, timeout=60) as c:
        job = c.post("/v1/jobs", json={"type": "evaluate", "model": "tiny", "params": {}}, headers=h).json()["id"]
        cases: list[tuple[str, httpx.Response]] = []
        accepted = {"upload " + repr("a\x00b.jsonl")}  # the client escapes the NUL: a fine name then

        def add(case, r):
            cases.append((case, r))

        # NUL bytes (and other control characters) in ids, cursors and names
        add("nul job id", c.get("/v1/jobs/job_%00abc", headers=h))
        add("nul job id events", c.get("/v1/jobs/%00/events", headers=h))
        add("nul job id cancel", c.post("/v1/jobs/job%00/cancel", headers=h))
        add("nul file id", c.get("/v1/files/file_%00", headers=h))
        add("nul cursor", c.get("/v1/jobs", params={"after": "job_\x00x"}, headers=h))
        add("nul artifact", c.get(f"/v1/jobs/{job}/artifacts/a%00b", headers=h))
        add("nul artifact head", c.head(f"/v1/jobs/{job}/artifacts/a%00b", headers=h))
        add("nul status filter", c.get("/v1/jobs", params={"status": "\x00"}, headers=h))
        for field, body in (("model", {"type": "evaluate", "model": "ti\x00ny", "params": {}}),
                            ("data", {"type": "evaluate", "model": "tiny", "params": {"data": "bo\x00olq"}}),
                            ("data file", {"type": "evaluate", "model": "tiny", "params": {"data": "file_\x00"}}),
                            ("model job", {"type": "evaluate", "model": "job_\x00", "params": {}}),
                            ("calibration", {"type": "compress", "model": "tiny",
                                             "params": {"err": 0.2, "calibration": "file_\x00"}}),
                            ("teacher", {"type": "finetune", "model": "tiny",
                                         "params": {"data": "boolq", "teacher": "t\x00"}})):
            add(f"nul {field}", c.post("/v1/jobs", json=body, headers=h))
        # numbers that are not numbers, and strings for numbers
        for value in ("NaN", "Infinity", "-Infinity", "1e400", "-1e400", '"0.3"', "true", "null", "[0.3]"):
            add(f"err={value}", _post_raw(c, "/v1/jobs", f'{{"type": "compress", "model": "tiny", '
                                                         f'"params": {{"err": {value}}}}}'.encode(), h))
        add("seq_len=1e400", _post_raw(c, "/v1/jobs", b'{"type": "evaluate", "model": "tiny", '
                                                      b'"params": {"seq_len": 1e400}}', h))
        add("windows 5000 digits", _post_raw(c, "/v1/jobs", b'{"type": "evaluate", "model": "tiny", '
                                                            b'"params": {"windows": ' + b"9" * 5000 + b"}}", h))
        add("merged=1", c.post("/v1/jobs", json={"type": "compress", "model": "tiny",
                                                 "params": {"err": 0.2, "merged": 1}}, headers=h))
        # bodies: not JSON, not declared JSON, nested, huge
        add("text/plain body", _post_raw(c, "/v1/jobs", b'{"type": "evaluate", "model": "tiny"}', h, "text/plain"))
        add("no content type", c.post("/v1/jobs", content=b'{"type": "evaluate", "model": "tiny"}', headers=h))
        add("form body", _post_raw(c, "/v1/jobs", b"type=evaluate&model=tiny", h,
                                   "application/x-www-form-urlencoded"))
        add("not json", _post_raw(c, "/v1/jobs", b"{nope", h))
        add("empty body", _post_raw(c, "/v1/jobs", b"", h))
        add("json array", _post_raw(c, "/v1/jobs", b"[]", h))
        add("nested json", _post_raw(c, "/v1/jobs", b"[" * 100_000 + b"]" * 100_000, h))
        add("nested params", _post_raw(c, "/v1/jobs", b'{"type": "evaluate", "model": "tiny", "params": '
                                       + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}", h))
        add("huge model name", c.post("/v1/jobs", json={"type": "evaluate", "model": "m" * 100_000}, headers=h))
        add("non-utf8 body", _post_raw(c, "/v1/jobs", b'{"type": "evaluate", "model": "\xff\xfe"}', h))
        # uploads
        for name, content in (("nested.jsonl", b'{"text": ' + b"[" * 50_000 + b"]" * 50_000 + b"}\n"),
                              ("bigint.jsonl", b'{"text": "a", "n": ' + b"7" * 5000 + b"}\n"),
                              ("nan.txt", b"\xff\xfe\x00"), ("a\x00b.jsonl", b'{"text": "x"}\n'),
                              ("empty.txt", b""), ("x.exe", b"MZ")):
            add(f"upload {name!r}", c.post("/v1/files", files={"file": (name, content)}, headers=h))
        add("upload other field", c.post("/v1/files", files={"data": ("a.txt", b"hi")}, headers=h))
        add("upload not multipart", _post_raw(c, "/v1/files", b"hello", h, "text/plain"))
        add("upload bad multipart", _post_raw(c, "/v1/files", b"--xx\r\nnonsense", h, "multipart/form-data; boundary=xx"))
        add("upload declared too large", c.post("/v1/files", headers=h, files={
            "file": ("big.txt", b"x" * (idle.upload_max_bytes + 100 * 1024))}))

        def chunks():
            yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.txt"\r\n\r\n'
            for _ in range(idle.upload_max_bytes // 65536 + 4):
                yield b"y" * 65536
            yield b"\r\n--b--\r\n"

        add("upload chunked too large", c.post("/v1/files", content=chunks(),
                                               headers={**h, "Content-Type": "multipart/form-data; boundary=b"}))
        # headers
        add("huge Last-Event-ID", c.get(f"/v1/jobs/{job}/events", headers={**h, "Last-Event-ID": "9" * 5000}))
        add("text Last-Event-ID", c.get(f"/v1/jobs/{job}/events", headers={**h, "Last-Event-ID": "abc"}))
        add("negative Last-Event-ID", c.get(f"/v1/jobs/{job}/events", headers={**h, "Last-Event-ID": "-1"}))
        add("huge Idempotency-Key", c.post("/v1/jobs", json={"type": "evaluate", "model": "tiny"},
                                           headers={**h, "Idempotency-Key": "k" * 1000}))
        add("odd Idempotency-Key", c.post("/v1/jobs", json={"type": "evaluate", "model": "tiny"},
                                          headers={**h, "Idempotency-Key": "a b\tc"}))
        add("odd bearer", c.get("/v1/jobs", headers={"Authorization": b"Bearer wl_" + b"\xe9" * 300}))
        add("no bearer", c.get("/v1/jobs", headers={"Authorization": "Bearer"}))
        # queries
        for params in ({"limit": "abc"}, {"limit": "1e400"}, {"limit": "9" * 5000}, {"limit": "-1"},
                       {"type": "x" * 10_000}, {"after": "x" * 10_000}, {"format": "xml"}):
            path = f"/v1/jobs/{job}/events" if "format" in params else "/v1/jobs"
            add(f"query {str(params)[:40]}", c.get(path, params=params, headers=h))
        add("unknown route", c.get("/v1/nothing", headers=h))
        add("wrong method", c.delete(f"/v1/jobs/{job}", headers=h))

    assert len(cases) > 60
    for case, r in cases:
        _check(r, case, [201, *range(400, 500)] if case in accepted else range(400, 500))
    out = {case: r.status_code for case, r in cases}
    assert out["upload chunked too large"] == 413 and out["upload declared too large"] == 413
    assert out["text/plain body"] == 415 and out["huge Last-Event-ID"] == 422
    assert out['err="0.3"'] == 422 and out["err=NaN"] == 422 and out["err=1e400"] == 422
    assert not list((idle.artifact_dir / ".tmp").glob("*.upload"))  # refused uploads leave nothing


def test_a_body_not_declared_json_is_415_naming_the_header(server, keys):
    api, _ = server
    with httpx.Client(base_url=api.url, timeout=60) as c:
        for ctype in ("text/plain", "application/x-www-form-urlencoded"):
            r = _post_raw(c, "/v1/jobs", b'{"type": "evaluate", "model": "tiny"}', keys["A"], ctype)
            assert r.status_code == 415, (ctype, r.status_code, r.text[:300])
            assert r.json()["error"]["code"] == "unsupported_media_type"
            assert "Content-Type: application/json" in r.json()["error"]["message"]
        ok = _post_raw(c, "/v1/jobs", b'{"type": "evaluate"}', keys["A"], "application/json; charset=utf-8")
        assert ok.status_code == 422  # declared JSON, invalid: the field errors, not 415


def _b64(raw: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_malformed_link_tokens_are_404_and_log_no_traceback(server, keys, settings):
    """Unauthenticated: a token whose payload is not ours (an exponent that overflows, lists nested
    3000 deep, a lone surrogate in a name, wrong types, not base64; a real key's payload with a
    signature that is not ASCII) is the link_invalid 404."""
    import json
    import time

    from sqlalchemy import select

    from api.db import session_scope
    from api.models import ApiKey

    api, _ = server
    with session_scope(settings.db_url) as s:
        key_id = s.scalars(select(ApiKey.id)).first()
    real = _b64(json.dumps({"k": key_id, "j": "job_x", "n": "a", "e": int(time.time()) + 600}).encode())
    payloads = [b'{"k":"x","j":"y","n":"z","e":1e999}', b"[" * 3000 + b"]" * 3000,
                b'{"k":"\\ud800","j":"y","n":"z","e":1}', b'{"k":"x","j":"\\udfff","n":"z","e":99999999999}',
                b'{"k":"x","j":"y","n":"\\ud800","e":99999999999}', b'{"k":"x","j":"y","n":"z","e":"1"}',
                b'{"k":["x"],"j":"y","n":"z","e":1}', b'{"k":"x","j":"y","n":"z","e":1.5}',
                b'{"k":"x","j":"y","n":"z","e":' + b"9" * 5000 + b"}", b'"just a string"', b"null", b"",
                b'{"k":"\xed\xa0\x80","j":"y","n":"z","e":1}', b'{"k":{"a":' * 2000 + b"1" + b"}" * 2000 + b"}"]
    with httpx.Client(base_url=api.url, timeout=60) as c:
        tokens = [f"{_b64(p)}.{_b64(b'sig')}" for p in payloads] + ["%%%.x", "....", "a" * 5000, "%00", "é.é",
                                                                  f"{real}.{'é' * 43}", f"{real}.x"]
        for token in tokens:
            r = c.get(f"/v1/links/{token}")
            _check(r, token[:40])
            assert r.status_code == 404 and r.json()["error"]["code"] == "link_invalid", (token[:40], r.text[:300])
    assert "Traceback" not in api.output() and "unhandled error" not in api.output()


SURROGATES = ('"\\ud800"', '"\\udfff"', '"a\\udbff b"', '["\\ud800"]', '{"\\ud800": 1}')


def _surrogate_cases(model: str) -> list[tuple[str, str, bytes]]:
    """(case, path, raw JSON body) with a lone surrogate escape in every field of every job type
    (each params field, `model`, `type`, a key) and the link request's `name`."""
    from api.jobs.params import PARAMS

    cases = []
    for job_type, schema in PARAMS.items():
        for value in SURROGATES:
            for field in schema.model_fields:
                cases.append((f"{job_type} params.{field}={value}", "/v1/jobs",
                              f'{{"type": "{job_type}", "model": "{model}", "params": {{"{field}": {value}}}}}'))
            cases.append((f"{job_type} model={value}", "/v1/jobs",
                          f'{{"type": "{job_type}", "model": {value}, "params": {{}}}}'))
            params = f"{{{value}: 1}}" if value.startswith('"') else value  # a key, else params itself
            cases.append((f"{job_type} params key {value}", "/v1/jobs",
                          f'{{"type": "{job_type}", "model": "{model}", "params": {params}}}'))
    for value in SURROGATES:
        cases.append((f"type={value}", "/v1/jobs", f'{{"type": {value}, "model": "{model}", "params": {{}}}}'))
        cases.append((f"top-level key {value}", "/v1/jobs", f'{{"type": "evaluate", "model": "{model}", {value}: 1}}'
                      if value.startswith('"') else f'{{"type": "evaluate", "model": {value}}}'))
        cases.append((f"link name={value}", "LINKS", f'{{"name": {value}}}'))
    return [(case, path, body.encode()) for case, path, body in cases]


def test_a_lone_surrogate_anywhere_in_a_json_body_is_a_422_naming_the_field(server, keys):
    """A JSON string escape that is half a UTF-16 pair is not text: wherever it is (every field of
    every job type, a key, a link's name), the answer is a 422 naming where, never a 500."""
    api, _ = server
    h = keys["A"]
    with httpx.Client(base_url=api.url, timeout=60) as c:
        job = c.post("/v1/jobs", json={"type": "evaluate", "model": "tiny", "params": {}}, headers=h).json()["id"]
        cases = _surrogate_cases("tiny")
        cases.append(("utf-8 encoded surrogate", "/v1/jobs", b'{"type": "evaluate", "model": "\xed\xa0\x80"}'))
        assert len(cases) > 250
        out = {}
        for case, path, raw in cases:
            r = _post_raw(c, f"/v1/jobs/{job}/links" if path == "LINKS" else path, raw, h)
            _check(r, case)
            assert r.status_code == 422, (case, r.status_code, r.text[:300])
            out[case] = r.json()["error"]
        # The case of issue 41: a compress param holding a lone surrogate, reported like any bad value.
        err = out['compress params.err="\\ud800"']
        assert err["code"] == "invalid_params" and err["fields"][0]["field"] == "params.err", err
        assert "surrogate" in err["message"] and err["fields"][0]["received"] == "\\ud800", err
        assert out['evaluate model=["\\ud800"]']["fields"][0]["field"] == "model.0"
        # A valid escaped pair is text (an emoji): no model of that name, a clean 404.
        r = _post_raw(c, "/v1/jobs", b'{"type": "evaluate", "model": "\\ud83d\\ude00"}', h)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text[:300]
    assert "Traceback" not in api.output()


def test_names_too_long_for_a_folder_and_long_boundaries_are_4xx(server, keys, settings):
    """A model name past the file system's 255-byte component limit (with WELORE_MODELS_DIR set),
    and a multipart boundary past python-multipart's 256 bytes: 422, nothing left in .tmp."""
    api, idle = server
    h = keys["A"]
    assert idle.models_dir is not None
    with httpx.Client(base_url=api.url, timeout=60) as c:
        for body in ({"type": "evaluate", "model": "m" * 300},
                     {"type": "evaluate", "model": "a/" + "m" * 300 + "/b"},
                     {"type": "finetune", "model": "tiny",
                      "params": {"data": "boolq", "teacher": "t" * 140 + "é" * 60}}):  # 200 characters, 260 bytes
            r = c.post("/v1/jobs", json=body, headers=h)
            _check(r, body["model"][:20])
            assert r.status_code == 422 and "255 bytes" in r.json()["error"]["message"], r.text[:300]
        for n in (257, 300, 5000):
            boundary = "b" * n
            raw = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n\r\nhi\r\n"
                   f"--{boundary}--\r\n").encode()
            r = _post_raw(c, "/v1/files", raw, h, f"multipart/form-data; boundary={boundary}")
            _check(r, f"boundary {n}")
            assert r.json()["error"]["code"] == "invalid_upload" and "boundary" in r.json()["error"]["message"]
    assert not list((idle.artifact_dir / ".tmp").glob("*.upload"))
    assert "Traceback" not in api.output()
