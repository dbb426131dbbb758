"""The embedded default: `welore serve` with no configuration (SQLite, a local artifact
directory, an in-process worker, no Redis) started as a real process over HTTP. It migrates
itself, prints a first API key, runs jobs asynchronously, streams events, and on restart
re-queues a job that the previous process left running."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from embedded_server import ROOT, Server, free_port
from helpers import parse_sse, sha256


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def embedded(home, models_dir):
    server = Server(home, models_dir)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def api_key(embedded):
    return {"Authorization": f"Bearer {embedded.api_key()}"}


def _wait(c: httpx.Client, job_id: str, h: dict, statuses=("succeeded", "failed", "cancelled"), timeout=300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = c.get(f"/v1/jobs/{job_id}", headers=h).json()
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.3)


def test_first_start_migrates_and_prints_a_key(embedded, api_key, home):
    state = home / ".local" / "share" / "welore"
    assert (state / "welore.db").is_file() and (state / "artifacts").is_dir()
    with httpx.Client(base_url=embedded.url, timeout=30) as c:
        ready = c.get("/readyz").json()
        assert ready["status"] == "ready" and ready["mode"] == "embedded"
        assert c.get("/v1/jobs").status_code == 401
        assert c.get("/v1/jobs", headers=api_key).json() == {"data": [], "next_cursor": None}


def test_compress_then_finetune_in_process(embedded, api_key):
    h = api_key
    with httpx.Client(base_url=embedded.url, timeout=60) as c:
        r = c.post("/v1/jobs", json={"type": "compress", "model": "tiny", "params": {"err": 0.3, "min_ratio": 0.0,
                                                                                    "calibration": "none"}},
                   headers=h)
        assert r.status_code == 202 and r.json()["status"] == "queued"  # the request returns before the work
        job_id = r.json()["id"]
        with c.stream("GET", f"/v1/jobs/{job_id}/events", headers=h) as s:
            events = parse_sse(s.read().decode())
        assert [e["data"]["status"] for e in events if e["type"] == "status"] == ["queued", "running", "succeeded"]
        job = c.get(f"/v1/jobs/{job_id}", headers=h).json()
        assert job["status"] == "succeeded" and abs(job["result"]["err_achieved"] - 0.3) <= 0.01
        arts = c.get(f"/v1/jobs/{job_id}/artifacts", headers=h).json()["data"]
        weights = next(a for a in arts if a["name"] == "model.safetensors")
        body = c.get(f"/v1/jobs/{job_id}/artifacts/model.safetensors", headers=h).content
        assert sha256(body) == weights["sha256"]
        part = c.get(f"/v1/jobs/{job_id}/artifacts/model.safetensors", headers={**h, "Range": "bytes=0-99"})
        assert part.status_code == 206 and part.content == body[:100]

        params = {"data": "boolq-passages", "steps": 3, "batch_size": 1, "seq_len": 16, "val_sequences": 1,
                  "teacher": "tiny"}  # distilled from the dense model it was compressed from
        bad = c.post("/v1/jobs", json={"type": "finetune", "model": job_id,
                                       "params": {**params, "teacher": "no-such-model"}}, headers=h)
        assert bad.status_code == 404 and "no-such-model" in bad.json()["error"]["message"]
        ft = c.post("/v1/jobs", json={"type": "finetune", "model": job_id,
                                      "params": {**params, "merged": True, "dtype": "bf16"}}, headers=h).json()
        ft = _wait(c, ft["id"], h)
        assert ft["status"] == "succeeded", ft["error"]
        meta = c.get(f"/v1/jobs/{ft['id']}/artifacts/welore.json", headers=h).json()
        assert meta["training"]["config"]["teacher"].endswith("tiny") and meta["dtype"] == "bf16"
        names = {a["name"] for a in c.get(f"/v1/jobs/{ft['id']}/artifacts", headers=h).json()["data"]}
        assert {"model.safetensors", "welore.json", "config.json"} <= names
        assert ("modeling_welore.py" in names) == bool(meta["factored"])
        assert {"merged/model.safetensors", "merged/config.json"} <= names
        merged = c.get(f"/v1/jobs/{ft['id']}/artifacts/merged/config.json", headers=h).json()
        assert merged["model_type"] == "llama" and merged["dtype"] == "bfloat16" and "auto_map" not in merged
        series = c.get(f"/v1/jobs/{ft['id']}/metrics", headers=h).json()["series"]
        assert len(series["loss"]) == 3 and series["tokens_per_s"]


def test_keys_and_db_commands_share_the_embedded_database(embedded, api_key):
    def welore(*args):
        out = subprocess.run([sys.executable, "-m", "welore_core.cli", *args], cwd=ROOT, env=embedded.env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert welore("db", "current").strip() == "0004"
    new_key = welore("keys", "create", "--name", "second").strip().splitlines()[-1]
    with httpx.Client(base_url=embedded.url, timeout=30) as c:
        h2 = {"Authorization": f"Bearer {new_key}"}
        assert c.get("/v1/jobs", headers=h2).json()["data"] == []  # the first key's jobs are invisible
        assert len(c.get("/v1/jobs", headers=api_key).json()["data"]) == 2


def test_restart_requeues_an_interrupted_job(embedded, api_key, home, models_dir):
    """A second `welore serve` on the same state directory refuses to start and touches nothing;
    stopping the server mid-job puts the job back to queued with its attempt given back; the next
    start runs it again."""
    h = api_key
    with httpx.Client(base_url=embedded.url, timeout=60) as c:
        compressed = c.get("/v1/jobs", params={"type": "compress"}, headers=h).json()["data"][0]["id"]
        job = c.post("/v1/jobs", json={"type": "finetune", "model": compressed,
                                       "params": {"data": "boolq-passages", "steps": 100000, "batch_size": 1,
                                                  "seq_len": 16, "val_sequences": 1}}, headers=h).json()
        running = _wait(c, job["id"], h, statuses=("running",))
        second = subprocess.run([sys.executable, "-m", "welore_core.cli", "serve", "--port", str(free_port())],
                                cwd=ROOT, env=embedded.env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stdout + second.stderr
        assert "another `welore serve`" in second.stderr and "WELORE_STATE_DIR" in second.stderr
        still = c.get(f"/v1/jobs/{job['id']}", headers=h).json()
        assert still["status"] == "running" and still["attempts"] == running["attempts"] == 1
    assert embedded.stop() == 0
    restarted = Server(home, models_dir)
    try:
        assert "WELORE_API_KEY" not in restarted.output()  # the database already has keys
        with httpx.Client(base_url=restarted.url, timeout=60) as c:
            again = _wait(c, job["id"], h, statuses=("running",))
            assert again["attempts"] == 1  # the graceful stop gave its attempt back
            assert c.post(f"/v1/jobs/{job['id']}/cancel", headers=h).status_code == 202
            assert _wait(c, job["id"], h)["status"] == "cancelled"
            events = c.get(f"/v1/jobs/{job['id']}/events", params={"format": "json"}, headers=h).json()
            logs = [e["data"].get("message", "") for e in events if e["type"] == "log"]
            assert any("shutting down" in m for m in logs)
            assert [e["data"]["status"] for e in events if e["type"] == "status"] == [
                "queued", "running", "queued", "running", "cancelled"]
    finally:
        assert restarted.stop() == 0


def test_sqlite_migrations_round_trip(tmp_path):
    from api import migrate

    url = f"sqlite:///{tmp_path / 'm.db'}"
    migrate.upgrade(url)
    assert migrate.current(url) == "0004"
    migrate.downgrade(url, "base")
    assert migrate.current(url) is None
    migrate.upgrade(url)
    assert migrate.current(url) == "0004"
