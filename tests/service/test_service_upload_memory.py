"""Upload memory is bounded whatever the lines hold: the API process's peak RSS (its VmHWM, reset
before each upload through /proc/PID/clear_refs) grows by a bounded amount for a 64 MiB upload
that is one JSONL line (refused, naming the line limit), one TXT line (accepted) or many long
JSONL lines (accepted), against the real uvicorn server and Postgres. Before this, a single-line
JSONL upload took ~3.6× its size."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from procs import ApiServer

pytestmark = pytest.mark.service

MiB = 2**20
SIZE, LINE_LIMIT = 64 * MiB, 4 * MiB
GROWTH_BOUND = 10 * LINE_LIMIT  # a few copies of one line, plus buffers; well under the upload's size


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _peak_growth(pid: int, upload) -> tuple[httpx.Response, int]:
    """(response, peak RSS during `upload()` minus the RSS before it)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError as exc:
        pytest.skip(f"cannot reset the API process's peak RSS ({exc}); the memory bound needs /proc/PID/clear_refs")
    before = _status(pid)["VmRSS"]
    r = upload()
    return r, _status(pid)["VmHWM"] - before


@pytest.fixture(scope="module")
def server(settings, tmp_path_factory):
    big = settings.model_copy(update={"upload_max_bytes": SIZE + MiB, "upload_max_line_bytes": LINE_LIMIT,
                                      "queue_prefix": settings.queue_prefix + "_mem"})
    api = ApiServer(big, tmp_path_factory.mktemp("upload-memory"))
    try:
        yield api
    finally:
        api.stop()


def test_upload_memory_is_bounded_independently_of_line_length(server, keys):
    one_line = b'{"text": "' + b"a" * (SIZE - 12) + b'"}\n'
    long_lines = (b'{"text": "' + b"b" * (LINE_LIMIT - 13) + b'"}\n') * (SIZE // LINE_LIMIT)
    txt = b"c" * SIZE
    with httpx.Client(base_url=server.url, timeout=300, headers=keys["A"]) as c:
        c.get("/v1/files")  # warm: the first request's imports are not the upload's memory
        growth = {}
        r, growth["one JSONL line"] = _peak_growth(server.pid, lambda: c.post(
            "/v1/files", files={"file": ("one.jsonl", one_line)}))
        assert r.status_code == 422 and r.json()["error"]["line"] == 1, r.text[:300]
        assert f"limit of {LINE_LIMIT} bytes" in r.json()["error"]["message"]
        assert "WELORE_UPLOAD_MAX_LINE_BYTES" in r.json()["error"]["message"]
        r, growth["one TXT line"] = _peak_growth(server.pid, lambda: c.post(
            "/v1/files", files={"file": ("one.txt", txt)}))
        assert r.status_code == 201 and r.json()["size"] == SIZE, r.text[:300]
        r, growth["long JSONL lines"] = _peak_growth(server.pid, lambda: c.post(
            "/v1/files", files={"file": ("long.jsonl", long_lines)}))
        assert r.status_code == 201 and r.json()["records"] == SIZE // LINE_LIMIT, r.text[:300]
    assert all(g < GROWTH_BOUND for g in growth.values()), {k: f"{v / MiB:.1f} MiB" for k, v in growth.items()}
