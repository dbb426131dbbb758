"""Small helpers for service tests: waiting for a job, reading SSE streams, hashing."""

from __future__ import annotations

import hashlib
import json
import os
import time

TERMINAL = ("succeeded", "failed", "cancelled")


def wait_for(client, job_id: str, headers: dict, statuses=TERMINAL, timeout: float = 300.0, poll: float = 0.3) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} (stage {job['stage']}) after {timeout} s")
        time.sleep(poll)


def parse_sse(text: str) -> list[dict]:
    events = []
    for block in text.split("\n\n"):
        data = [line[6:] for line in block.splitlines() if line.startswith("data: ")]
        if data:
            events.append(json.loads("\n".join(data)))
    return events


def read_sse(client, job_id: str, headers: dict) -> list[dict]:
    """The whole SSE stream of a job (it ends when the job does)."""
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return parse_sse("".join(r.iter_text()))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def service_env(settings) -> dict[str, str]:
    """The environment a worker (or `welore` command) needs to share the tests' services."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WELORE_")}
    env.update({
        "WELORE_DATABASE_URL": settings.database_url,
        "WELORE_REDIS_URL": settings.redis_url,
        "WELORE_ARTIFACT_DIR": str(settings.artifact_dir),
        "WELORE_MODELS_DIR": str(settings.models_dir),
        "WELORE_QUEUE_PREFIX": settings.queue_prefix,
        "WELORE_HEARTBEAT_S": str(settings.heartbeat_s),
        "WELORE_STATE_DIR": str(settings.state_dir),
        "WELORE_CACHE_DIR": os.environ["WELORE_CACHE_DIR"],
        "WELORE_DATA_DIR": os.environ["WELORE_DATA_DIR"],
        "WELORE_DEVICE": os.environ.get("WELORE_DEVICE", "auto"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def make_client(settings):
    from fastapi.testclient import TestClient

    from worker.embedded import create_app  # the API app, with the in-process worker when embedded

    return TestClient(create_app(settings))
