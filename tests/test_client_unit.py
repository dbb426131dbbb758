"""welore_client pieces that need no server: the retry policy (through an httpx mock transport:
the server boundary is faked here, the real service is in tests/service/test_client_*.py), the
error mapping, the SSE parser, environment defaults, and that importing it loads no torch."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from welore_client import Client, ServerError, ServiceUnavailableError, ValidationError, sse

JOB = {"id": "job_1", "type": "compress", "model": "tiny", "params": {}, "status": "queued", "progress": 0,
       "queue": "q", "attempts": 0, "cancel_requested": False, "created_at": "2026-01-01T00:00:00Z"}


def scripted(*responses):
    """A transport answering each request with the next response; records the requests."""
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        status, body, headers = responses[min(len(seen), len(responses)) - 1]
        return httpx.Response(status, json=body, headers=headers or {})

    return httpx.MockTransport(handler), seen


UNAVAILABLE = (503, {"error": {"code": "unavailable", "message": "broker down"}}, {"Retry-After": "0"})


def test_get_is_retried_after_503_with_retry_after():
    transport, seen = scripted(UNAVAILABLE, UNAVAILABLE, (200, JOB, None))
    with Client("http://x", api_key="wl_k", transport=transport, backoff_s=0.001) as c:
        assert c.jobs.get("job_1").id == "job_1"
    assert len(seen) == 3 and seen[0].headers["authorization"] == "Bearer wl_k"


def test_a_submit_is_retried_only_with_an_idempotency_key():
    transport, seen = scripted(UNAVAILABLE, (202, JOB, None))
    with Client("http://x", api_key="k", transport=transport, backoff_s=0.001) as c:
        with pytest.raises(ServiceUnavailableError) as exc:
            c.jobs.create("compress", "tiny", {"err": 0.3})
        assert exc.value.status == 503 and exc.value.code == "unavailable" and exc.value.message == "broker down"
        assert len(seen) == 1
        seen.clear()
        assert c.jobs.create("compress", "tiny", {"err": 0.3}, idempotency_key="a").id == "job_1"
        assert len(seen) == 2 and all(r.headers["idempotency-key"] == "a" for r in seen)


def test_retries_give_up_after_max_retries():
    transport, seen = scripted(UNAVAILABLE)
    with Client("http://x", api_key="k", transport=transport, max_retries=2, backoff_s=0.001) as c:
        with pytest.raises(ServiceUnavailableError):
            c.models.list()
    assert len(seen) == 3


def test_error_mapping_keeps_code_message_and_fields():
    fields = [{"field": "params.err", "message": "Input should be less than 1", "allowed": "0 ≤ value < 1"}]
    transport, _ = scripted((422, {"error": {"code": "invalid_params", "message": "params.err: …", "fields": fields}},
                             None))
    with Client("http://x", api_key="k", transport=transport) as c:
        with pytest.raises(ValidationError) as exc:
            c.jobs.create("compress", "tiny", {"err": 2})
    assert exc.value.fields == fields and exc.value.status == 422 and "HTTP 422 invalid_params" in str(exc.value)

    transport = httpx.MockTransport(lambda r: httpx.Response(500, text="<html>proxy error</html>"))
    with Client("http://x", api_key="k", transport=transport) as c:
        with pytest.raises(ServerError) as exc:
            c.jobs.get("job_1")
    assert exc.value.code == "http_500" and "proxy error" in exc.value.message


def test_sse_parser():
    lines = ["id: 1", "event: status", 'data: {"a":', "data: 1}", "", ": keepalive", "", "id: 2", "data: {}", "",
             "id: 3", "data: {\"cut"]
    assert list(sse.parse(lines)) == [("1", "status", '{"a":\n1}'), ("2", "message", "{}")]  # the cut one is dropped


def test_defaults_from_the_environment(monkeypatch):
    monkeypatch.setenv("WELORE_API_URL", "http://example.invalid:1234/")
    monkeypatch.setenv("WELORE_API_KEY", "wl_env")
    with Client() as c:
        assert c.base_url == "http://example.invalid:1234"
        assert c._transport.http.headers["authorization"] == "Bearer wl_env"


def test_importing_the_client_loads_no_torch():
    code = ("import sys, welore_client, welore_client.cli; "
            "bad = [m for m in ('torch', 'welore_core', 'fastapi', 'sqlalchemy') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_client_packages_on_its_own(tmp_path):
    """clients/python builds a wheel holding welore_client only, depending on httpx and pydantic."""
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(root / "clients" / "python")], check=True, timeout=300, capture_output=True)
    (wheel,) = tmp_path.glob("welore_client-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
        scripts = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"welore_client"}
    assert "welore_client/jobs.py" in names and "welore_client/py.typed" in names
    requires = sorted(line.split(":", 1)[1].strip().split(">")[0] for line in meta.splitlines()
                      if line.startswith("Requires-Dist:"))
    assert requires == ["httpx", "pydantic"]
    assert "welore = welore_client.cli:main" in scripts
