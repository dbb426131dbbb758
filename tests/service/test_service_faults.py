"""Faults against the production setup (Postgres + Redis + `welore serve` + separate `welore
worker` processes), with a short heartbeat timeout (4 s):

- kill -9 a worker (the whole process group) mid-compression: with no worker left the job leaves
  `running` within the heartbeat timeout (the API's reaper puts it back in the queue), and the
  next worker re-runs it to success; the dead attempt's half-written output is removed;
- kill -9 only a worker's pool process: Celery redelivers the task, which finds the job held by a
  dead runner, takes it over instead of dropping itself, and the job succeeds;
- SIGTERM a worker mid-job: it stops at once, the job goes back to the queue with its attempt
  given back, and another worker runs it;
- revoke the API key an SSE stream was opened with: the stream ends within seconds (the fan-out
  re-checks the keys), while the job goes on.

Outages of the servers themselves (Redis, Postgres) are in test_service_outages.py.
"""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from procs import ApiServer, Worker

pytestmark = pytest.mark.service

TERMINAL = ("succeeded", "failed", "cancelled")
# Calibrated compression of the tiny model: a few seconds of work in a fresh worker process.
COMPRESS = {"type": "compress", "model": "tiny",
            "params": {"err": 0.3, "min_ratio": 0.0, "calibration": "boolq", "calib_samples": 8, "calib_seq_len": 64}}
LONG_FINETUNE = {"data": "boolq-passages", "steps": 100000, "batch_size": 1, "seq_len": 16, "val_sequences": 1}


@pytest.fixture(scope="module")
def fast(settings, tmp_path_factory):
    return settings.model_copy(update={"queue_prefix": settings.queue_prefix + "_faults", "heartbeat_s": 0.5,
                                       "heartbeat_timeout_s": 4.0, "max_attempts": 3})


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("fault-logs")


@pytest.fixture(scope="module")
def api(fast, logs):
    server = ApiServer(fast, logs)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def http(api):
    with httpx.Client(base_url=api.url, timeout=60) as c:
        yield c


def _status(http, key, job_id) -> dict:
    return http.get(f"/v1/jobs/{job_id}", headers=key).json()


def _wait(http, key, job_id, statuses, timeout=180.0, poll=0.05) -> tuple[dict, float]:
    t0 = time.monotonic()
    while True:
        job = _status(http, key, job_id)
        if job["status"] in statuses:
            return job, time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, job
        time.sleep(poll)


def _runner_pid(settings, job_id) -> int:
    from api.db import session_scope
    from api.models import Job

    with session_scope(settings.db_url) as s:
        return int(s.get(Job, job_id).runner.split(":")[1])


def _statuses(http, key, job_id) -> list[str]:
    events = http.get(f"/v1/jobs/{job_id}/events", params={"format": "json"}, headers=key).json()
    return [e["data"]["status"] for e in events if e["type"] == "status"]


def test_kill_9_mid_compression_then_another_worker_reruns_it(fast, logs, http, keys):
    h = keys["A"]
    first = Worker(fast, logs, "first")
    try:
        job = http.post("/v1/jobs", json=COMPRESS, headers=h).json()
        _wait(http, h, job["id"], ("running", *TERMINAL))
        assert _runner_pid(fast, job["id"]) in first.pids()
        tmp = fast.artifact_dir / ".tmp"
        _wait_for(lambda: any(p.name.startswith(job["id"]) for p in tmp.iterdir()))
    finally:
        first.kill()
    assert _status(http, h, job["id"])["status"] == "running"  # killed mid-work: nothing ended it
    left, waited = _wait(http, h, job["id"], ("queued", *TERMINAL), timeout=60)
    assert left["status"] == "queued" and left["attempts"] == 1
    assert waited <= fast.heartbeat_timeout_s + fast.reap_every_s + 2  # no worker needed to notice
    second = Worker(fast, logs, "second")
    try:
        done, _ = _wait(http, h, job["id"], TERMINAL)
    finally:
        second.stop()
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    assert abs(done["result"]["err_achieved"] - 0.3) <= 0.01
    assert _statuses(http, h, job["id"]) == ["queued", "running", "queued", "running", "succeeded"]
    assert not [p for p in (fast.artifact_dir / ".tmp").iterdir() if p.name.startswith(job["id"])]
    names = {a["name"] for a in http.get(f"/v1/jobs/{job['id']}/artifacts", headers=h).json()["data"]}
    assert {"welore.json", "model.safetensors"} <= names


def test_revoking_a_key_ends_its_open_event_streams(fast, http):
    from api.auth.keys import create_key, revoke
    from api.db import session_scope
    from api.jobs import states
    from api.models import Job

    with session_scope(fast.db_url) as s:
        row, plain = create_key(s, "revoked while it follows")
        key_id = row.id
    h = {"Authorization": f"Bearer {plain}"}
    job = http.post("/v1/jobs", json={"type": "evaluate", "model": "tiny", "params": {"seq_len": 8, "windows": 1}},
                    headers=h).json()  # stays queued: no worker reads this queue now
    lines = []
    # A read timeout under the 15 s keepalive: a stream that outlives the key fails here.
    with http.stream("GET", f"/v1/jobs/{job['id']}/events", headers=h, timeout=httpx.Timeout(60, read=10)) as r:
        stream = r.iter_lines()
        for line in stream:
            if line.startswith("data: "):
                break  # following
        with session_scope(fast.db_url) as s:
            assert revoke(s, key_id)
        lines = [line for line in stream if line]
    assert lines == [": the API key was revoked"]
    assert http.get(f"/v1/jobs/{job['id']}", headers=h).status_code == 401
    with session_scope(fast.db_url) as s:
        assert s.get(Job, job["id"]).status == "queued"  # the job itself goes on
        assert states.cancel(s, None, job["id"], key_id) is not None  # (not left for the next test's worker)


def _wait_for(cond, timeout=60.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout
        time.sleep(0.05)


@pytest.mark.slow
def test_a_redelivered_task_takes_over_from_its_dead_pool_process(fast, logs, http, keys):
    import os

    h = keys["A"]
    worker = Worker(fast, logs, "pool")
    try:
        job = http.post("/v1/jobs", json=COMPRESS, headers=h).json()
        _wait(http, h, job["id"], ("running", *TERMINAL))
        child = _runner_pid(fast, job["id"])
        assert child != worker.pid and child in worker.pids()
        os.kill(child, signal.SIGKILL)  # the main process survives and redelivers the task
        done, _ = _wait(http, h, job["id"], TERMINAL)
    finally:
        worker.stop()
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    assert "running elsewhere" not in worker.output()


@pytest.mark.slow
def test_sigterm_hands_the_job_back_without_spending_an_attempt(fast, logs, http, keys, compressed_tiny):
    h = keys["A"]
    first = Worker(fast, logs, "term")
    try:
        job = http.post("/v1/jobs", json={"type": "finetune", "model": compressed_tiny, "params": LONG_FINETUNE},
                        headers=h).json()
        _wait(http, h, job["id"], ("running", *TERMINAL))
        with http.stream("GET", f"/v1/jobs/{job['id']}/events", headers=h) as stream:
            for line in stream.iter_lines():  # wait until it trains
                if line.startswith("data: ") and '"loss"' in line:
                    break
        t0 = time.monotonic()
        assert first.stop(signal.SIGTERM, timeout=60) is not None
        stopped_in = time.monotonic() - t0
    finally:
        first.stop()
    back = _status(http, h, job["id"])
    assert back["status"] == "queued" and back["attempts"] == 0, back
    assert stopped_in < 30  # it did not wait for the 100000 steps
    second = Worker(fast, logs, "after-term")
    try:
        again, _ = _wait(http, h, job["id"], ("running", *TERMINAL))
        assert again["status"] == "running" and again["attempts"] == 1
        assert http.post(f"/v1/jobs/{job['id']}/cancel", headers=h).status_code == 202
        assert _wait(http, h, job["id"], TERMINAL)[0]["status"] == "cancelled"
    finally:
        second.stop()
    assert _statuses(http, h, job["id"]) == ["queued", "running", "queued", "running", "cancelled"]


@pytest.fixture(scope="module")
def compressed_tiny(fast, logs, http, keys):
    """A compressed tiny model (to fine-tune), made by a worker of its own."""
    worker = Worker(fast, logs, "compress")
    try:
        job = http.post("/v1/jobs", json={"type": "compress", "model": "tiny",
                                                  "params": {"err": 0.3, "min_ratio": 0.0, "calibration": "none"}},
                        headers=keys["A"]).json()
        done, _ = _wait(http, keys["A"], job["id"], TERMINAL)
    finally:
        worker.stop()
    assert done["status"] == "succeeded", done
    return job["id"]
