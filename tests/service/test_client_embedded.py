"""welore_client and the client commands of `welore` against `welore serve` (embedded) as a real
process: submit → events → wait → download and verify; resumed downloads; reconnecting event
streams; safe retries; pagination; cancel; error mapping. The same checks run against Postgres +
Redis + Celery in test_client_pg.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from embedded_server import ROOT, Server
from welore_client import Client


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir):
    s = Server(tmp_path_factory.mktemp("client-home"), models_dir)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.url, api_key=server.api_key()) as c:
        yield c


# the tests themselves (client_checks.py), run here against this module's `client`
from client_checks import (compressed, test_cancel, test_error_mapping, test_events_reconnect_with_last_event_id,  # noqa: E402,F401
                           test_pagination, test_resume_partial_download, test_retries_only_when_safe,
                           test_submit_events_wait_download)


def _welore(server, *args, key=True):
    env = {**server.env, "WELORE_API_URL": server.url}
    if key:
        env["WELORE_API_KEY"] = server.api_key()
    code = ("import sys; from welore_client.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'the client commands imported torch'; sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_client_commands(server, compressed, tmp_path):
    """`welore jobs|files|models` (the client's own front end here: the same register functions the
    `welore` entry points load), with --json, and without importing torch."""
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"text": f"passage {i} about rivers and lakes."}) + "\n" for i in range(8)))
    up = _welore(server, "files", "upload", str(data), "--json")
    assert up.returncode == 0, up.stderr
    file_id = json.loads(up.stdout.splitlines()[-1])["id"]
    assert file_id.startswith("file_")

    sub = _welore(server, "jobs", "submit", "evaluate", "tiny", "-p", f"data={file_id}", "-p", "seq_len=8",
                  "-p", "windows=1", "--wait", "--json")
    assert sub.returncode == 0, sub.stderr
    lines = [json.loads(x) for x in sub.stdout.splitlines()]
    assert lines[-1]["status"] == "succeeded" and lines[-1]["result"]["perplexity"] > 1
    assert [e["data"]["status"] for e in lines[:-1] if e["type"] == "status"] == ["queued", "running", "succeeded"]
    job_id = lines[-1]["id"]

    listed = json.loads(_welore(server, "jobs", "list", "--type", "evaluate", "--json").stdout.splitlines()[-1])
    assert job_id in [j["id"] for j in listed["data"]] and all(j["type"] == "evaluate" for j in listed["data"])
    shown = _welore(server, "jobs", "show", compressed[0])
    assert shown.returncode == 0 and "succeeded" in shown.stdout and "err_achieved" in shown.stdout
    watched = _welore(server, "jobs", "watch", compressed[0])
    assert watched.returncode == 0 and "status succeeded" in watched.stdout

    out = tmp_path / "dl"
    dl = _welore(server, "jobs", "download", compressed[0], "--out", str(out), "--json")
    assert dl.returncode == 0, dl.stderr
    files = json.loads(dl.stdout.splitlines()[-1])["files"]
    assert {"welore.json", "model.safetensors"} <= {f["name"] for f in files}
    models = json.loads(_welore(server, "models", "--json").stdout.splitlines()[-1])["data"]
    assert {"tiny", compressed[0]} <= {m["id"] for m in models}

    bad = _welore(server, "jobs", "submit", "compress", "tiny", "-p", "err=1.5")
    assert bad.returncode == 2 and "params.err" in bad.stderr and "HTTP 422 invalid_params" in bad.stderr
    cancel = _welore(server, "jobs", "cancel", compressed[0])
    assert cancel.returncode == 2 and "409" in cancel.stderr
    nokey = _welore(server, "jobs", "list", key=False)
    assert nokey.returncode == 2 and "WELORE_API_KEY" in nokey.stderr


def test_signed_download_links(server, client, compressed):
    """A link needs no Authorization header, honours Range, and a tampered token is refused."""
    import hashlib

    import httpx

    job_id = compressed[0]
    art = {a.name: a for a in client.jobs.artifacts(job_id)}["welore.json"]
    h = {"Authorization": f"Bearer {server.api_key()}"}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        link = c.post(f"/v1/jobs/{job_id}/links", json={"name": "welore.json"}, headers=h)
        assert link.status_code == 201, link.text
        url = link.json()["url"]
        body = c.get(url)
        assert body.status_code == 200 and hashlib.sha256(body.content).hexdigest() == art.sha256
        part = c.get(url, headers={"Range": "bytes=10-19"})
        assert part.status_code == 206 and part.content == body.content[10:20]
        payload, sig = url.rsplit("/", 1)[1].split(".")
        forged = c.get(f"/v1/links/{payload}.{sig[:-2]}xx")
        assert forged.status_code == 404 and forged.json()["error"]["code"] == "link_invalid"
        assert c.post(f"/v1/jobs/{job_id}/links", json={"name": "../x"}, headers=h).status_code == 404
        assert c.post(f"/v1/jobs/{job_id}/links", json={"name": "welore.json"}).status_code == 401
        ds = c.get("/v1/datasets", headers=h).json()["data"]
        assert {"boolq", "boolq-passages"} <= {d["id"] for d in ds if d["source"] == "builtin"}
