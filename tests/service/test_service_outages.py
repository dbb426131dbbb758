"""Outages of the servers around the API, on servers of the tests' own (tests/service/outages.py),
never the shared ones, with `welore serve` and `welore worker` processes and a short heartbeat
timeout (4 s):

- the broker is down when a job is submitted with an Idempotency-Key (the client retries): one
  job, kept queued, and the reaper sends it once the broker is back;
- the broker restarts empty (no persistence) after jobs were sent: their task messages are lost,
  and the reaper sends them again (their sent marks went with them), so they all run;
- the database is unreachable for three heartbeat timeouts under a running job: the job is not
  reaped for it (no attempt spent, no second run) and goes on once the database is back;
- a job ends while the database is unreachable: its outcome is written once it is back.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from outages import PrivateRedis, SwitchProxy, private_database, through
from procs import ApiServer, Worker

pytestmark = pytest.mark.service

TERMINAL = ("succeeded", "failed", "cancelled")
QUICK = {"type": "evaluate", "model": "tiny", "params": {"data": "boolq", "seq_len": 8, "windows": 1}}
LONG = {"type": "finetune", "model": "tiny", "params": {"data": "boolq-passages", "method": "full", "steps": 10**6,
                                                        "batch_size": 1, "seq_len": 8, "val_sequences": 1}}


def _fast(settings, **update):
    return settings.model_copy(update={"heartbeat_s": 0.5, "heartbeat_timeout_s": 4.0, "max_attempts": 3, **update})


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("outage-logs")


@pytest.fixture(scope="module")
def broker():
    redis = PrivateRedis()
    try:
        yield redis
    finally:
        redis.close()


@pytest.fixture(scope="module")
def on_private_redis(settings, broker):
    return _fast(settings, redis_url=broker.url, queue_prefix=settings.queue_prefix + "_broker")


@pytest.fixture(scope="module")
def api(on_private_redis, logs):
    server = ApiServer(on_private_redis, logs)
    try:
        yield server
    finally:
        server.stop()


def _row(settings, job_id):
    from api.db import session_scope
    from api.models import Job

    with session_scope(settings.db_url) as s:
        return s.get(Job, job_id)


def _until(cond, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        assert time.monotonic() < deadline, f"still not {what} after {timeout} s"
        time.sleep(0.2)
    return got


def _statuses(http, key, job_id) -> list[str]:
    events = http.get(f"/v1/jobs/{job_id}/events", params={"format": "json"}, headers=key).json()
    return [e["data"]["status"] for e in events if e["type"] == "status"]


def test_an_idempotent_submit_during_a_broker_outage_leaves_one_job(api, broker, on_private_redis, key):
    import redis

    from welore_client import Client

    broker.stop()
    try:
        with Client(api.url, key["Authorization"].split()[1], max_retries=4) as client:
            first = client.jobs.create(**QUICK, idempotency_key="outage-1")
            again = client.jobs.create(**QUICK, idempotency_key="outage-1")
            jobs = list(client.jobs.list())
    finally:
        broker.start()
    assert first.status == "queued" and again.id == first.id and [j.id for j in jobs] == [first.id]
    assert _row(on_private_redis, first.id).undispatched_since is not None  # its message is not sent yet
    _until(lambda: _row(on_private_redis, first.id).undispatched_since is None, "sent by the reaper")
    r = redis.Redis.from_url(broker.url)
    queued = r.lrange(on_private_redis.queue("gpu"), 0, -1)
    r.close()
    assert sum(first.id.encode() in m for m in queued) == 1


def test_jobs_whose_messages_the_broker_lost_in_a_restart_still_run(api, broker, on_private_redis, key, logs):
    with httpx.Client(base_url=api.url, timeout=60) as http:
        ids = [http.post("/v1/jobs", json=QUICK, headers=key).json()["id"] for _ in range(3)]
        assert all(_row(on_private_redis, i).undispatched_since is None for i in ids)  # sent
        broker.stop()  # no worker took them: the messages were only in Redis, which comes back empty
        broker.start()
        worker = Worker(on_private_redis, logs, "after-restart")
        try:
            done = [_until(lambda i=i: (j := http.get(f"/v1/jobs/{i}", headers=key).json())["status"] in TERMINAL
                           and j, "finished") for i in ids]
        finally:
            worker.stop()
        assert [(j["status"], j["attempts"]) for j in done] == [("succeeded", 1)] * 3, done
        assert all(_statuses(http, key, i) == ["queued", "running", "succeeded"] for i in ids)


def test_a_database_outage_longer_than_the_heartbeat_timeout_costs_no_attempt(settings, logs):
    """API and worker reach a database of their own only through proxies (one each) that the test
    cuts for 3 heartbeat timeouts (a reaper that could still read it would rightly count the
    silence). The API's comes back first and the worker's only after a reaper pass: the worst
    order, where the reaper reads the heartbeats before the worker could write one."""
    from api.auth.keys import create_key
    from api.db import session_scope
    from api.models import ReaperWatch, utcnow
    from conftest import PG_ADMIN_URL

    with private_database(PG_ADMIN_URL) as (direct, port):
        api_proxy, worker_proxy = SwitchProxy(port), SwitchProxy(port)
        prefix = settings.queue_prefix + "_dbcut"
        for_api = _fast(settings, database_url=through(direct, port, api_proxy), queue_prefix=prefix)
        for_worker = _fast(settings, database_url=through(direct, port, worker_proxy), queue_prefix=prefix)
        seen = settings.model_copy(update={"database_url": direct})  # read around the proxies
        with session_scope(direct) as s:
            key = {"Authorization": f"Bearer {create_key(s, 'outage')[1]}"}
        api = ApiServer(for_api, logs)
        worker = Worker(for_worker, logs, "db-cut")
        try:
            with httpx.Client(base_url=api.url, timeout=60) as http:
                job_id = http.post("/v1/jobs", json=LONG, headers=key).json()["id"]
                _until(lambda: (j := _row(seen, job_id)).status == "running" and j.progress > 0.05, "training")
                api_proxy.cut()
                worker_proxy.cut()
                time.sleep(3 * for_api.heartbeat_timeout_s)
                api_proxy.restore()
                back = utcnow()

                def reaper_pass() -> bool:
                    with session_scope(direct) as s:
                        return s.get(ReaperWatch, 1).last_pass_at > back

                _until(reaper_pass, "passed by the reaper")
                worker_proxy.restore()
                _until(lambda: (_row(seen, job_id).heartbeat_at or back) > back, "heartbeating again")
                time.sleep(for_api.heartbeat_timeout_s + 2 * for_api.reap_every_s)  # the reaper's chances to reap it
                row = _row(seen, job_id)
                assert (row.status, row.attempts) == ("running", 1), (row.status, row.attempts, row.error_code)
                assert http.post(f"/v1/jobs/{job_id}/cancel", headers=key).status_code == 202
                _until(lambda: _row(seen, job_id).status in TERMINAL, "cancelled")
                assert _statuses(http, key, job_id) == ["queued", "running", "cancelled"]
        finally:
            worker.stop()
            api.stop()
            api_proxy.close()
            worker_proxy.close()


def test_a_job_that_ends_during_a_database_outage_keeps_its_outcome(settings):
    """The worker's final write (succeeded, its result) waits for the database to come back."""
    from api.auth.keys import create_key
    from api.db import session_scope
    from api.events.bus import LocalEventBus
    from api.jobs import states
    from api.models import Job, new_id, utcnow
    from conftest import PG_ADMIN_URL
    from worker.publisher import Publisher
    from worker.runner import _end

    with private_database(PG_ADMIN_URL) as (direct, port):
        proxy = SwitchProxy(port)
        cut_off = settings.model_copy(update={"database_url": through(direct, port, proxy), "heartbeat_s": 0.5})
        job_id = new_id("job")
        with session_scope(direct) as s:
            key = create_key(s, "outage")[0]
            s.flush()
            states.submit(s, Job(id=job_id, owner_id=key.id, type="evaluate", model="tiny", model_ref={}, params={},
                                 queue="nowhere", progress=0.0, cancel_requested=False, attempts=0,
                                 created_at=utcnow()))
        with session_scope(direct) as s:
            assert states.claim(s, None, job_id, "the-runner", 3)[1] == ""
        bus = LocalEventBus()
        publisher = Publisher(cut_off, bus, job_id, "the-runner", "evaluate", 2, {})
        proxy.cut()
        back = threading.Timer(3 * cut_off.heartbeat_s * 2, proxy.restore)
        back.start()
        try:
            assert _end(cut_off, bus, publisher, job_id, states.SUCCEEDED, result={"ppl": 1.5}) == "succeeded"
        finally:
            back.join()
            proxy.close()
        with session_scope(direct) as s:
            row = s.get(Job, job_id)
            assert (row.status, row.result, row.attempts) == ("succeeded", {"ppl": 1.5}, 1)
