"""Load against the production setup (`welore serve` on Postgres + Redis, a separate `welore
worker`), over real HTTP on loopback, with a generous client timeout:

- 100 SSE followers on one running job while 100 concurrent status GETs succeed; the followers
  hold no database connection (none is left idle in a transaction), and all of them see the
  job's end;
- 200 concurrent status GETs and 100 concurrent submits: every one answered 2xx, every accepted
  job listed and finished.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from procs import ApiServer, Worker

pytestmark = pytest.mark.service

TERMINAL = ("succeeded", "failed", "cancelled")
TIMEOUT = httpx.Timeout(120.0)
LIMITS = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
QUICK = {"type": "evaluate", "model": "tiny", "params": {"data": "boolq", "seq_len": 8, "windows": 1}}


@pytest.fixture(scope="module")
def load(settings):
    return settings.model_copy(update={"queue_prefix": settings.queue_prefix + "_load"})


@pytest.fixture(scope="module")
def stack(load, tmp_path_factory):
    logs = tmp_path_factory.mktemp("load-logs")
    api = ApiServer(load, logs)
    try:
        worker = Worker(load, logs, "load")
        try:
            yield api
        finally:
            worker.stop()
    finally:
        api.stop()


def _connections(settings) -> dict[str, int]:
    import psycopg

    from conftest import PG_ADMIN_URL

    db = settings.db_url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_URL) as conn:
        rows = conn.execute("SELECT coalesce(state, ''), count(*) FROM pg_stat_activity WHERE datname = %s "
                            "GROUP BY 1", (db,)).fetchall()
    return dict(rows)


async def _gets(c: httpx.AsyncClient, path: str, h: dict, n: int) -> list[int]:
    rs = await asyncio.gather(*(c.get(path, headers=h) for _ in range(n)))
    return [r.status_code for r in rs]


async def _follow(c: httpx.AsyncClient, job_id: str, h: dict, started: asyncio.Event, count: list) -> list[dict]:
    events = []
    async with c.stream("GET", f"/v1/jobs/{job_id}/events", headers=h) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if len(events) == 1:
                    count.append(1)
                    if len(count) == 100:
                        started.set()
    return events


def test_100_sse_followers_while_100_gets_succeed(stack, load, keys):
    h = keys["A"]

    async def main():
        async with httpx.AsyncClient(base_url=stack.url, timeout=TIMEOUT, limits=LIMITS) as c:
            job = (await c.post("/v1/jobs", json={"type": "finetune", "model": "tiny", "params": {
                "data": "boolq-passages", "method": "full", "steps": 100000, "batch_size": 1, "seq_len": 8,
                "val_sequences": 1}}, headers=h)).json()
            while (await c.get(f"/v1/jobs/{job['id']}", headers=h)).json()["status"] != "running":
                await asyncio.sleep(0.2)
            started, count = asyncio.Event(), []
            followers = [asyncio.create_task(_follow(c, job["id"], h, started, count)) for _ in range(100)]
            await asyncio.wait_for(started.wait(), 120)
            await asyncio.sleep(2)  # let them settle on the fan-out
            # A follower holding a transaction would hold it in every sample; the running job's own writes
            # (heartbeat, progress) may be caught between two statements in one sample on a loaded machine.
            samples = []
            for _ in range(3):
                samples.append(_connections(load))
                await asyncio.sleep(0.5)
            conns = min(samples, key=lambda s: s.get("idle in transaction", 0))
            codes = await _gets(c, f"/v1/jobs/{job['id']}", h, 100)
            assert (await c.post(f"/v1/jobs/{job['id']}/cancel", headers=h)).status_code == 202
            streams = await asyncio.wait_for(asyncio.gather(*followers), 120)
            return codes, conns, streams

    codes, conns, streams = asyncio.run(main())
    assert codes == [200] * 100
    assert conns.get("idle in transaction", 0) == 0, conns
    assert sum(conns.values()) <= load.db_pool_size + 10, conns  # the API's pool, the worker's, this test's
    for events in streams:
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(set(seqs)) and seqs[0] == 0
        assert events[-1]["type"] == "status" and events[-1]["data"]["status"] == "cancelled"


def _submit_load(url: str, h: dict) -> set[str]:
    """200 concurrent status GETs, then 100 concurrent submits: all 2xx; → the accepted ids."""
    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, limits=LIMITS) as c:
            first = (await c.post("/v1/jobs", json=QUICK, headers=h)).json()
            gets = await _gets(c, f"/v1/jobs/{first['id']}", h, 200)
            posts = await asyncio.gather(*(c.post("/v1/jobs", json=QUICK, headers=h) for _ in range(100)))
            return first, gets, posts

    first, gets, posts = asyncio.run(main())
    assert gets == [200] * 200
    assert [r.status_code for r in posts] == [202] * 100
    ids = {first["id"], *(r.json()["id"] for r in posts)}
    with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        listed = c.get("/v1/jobs", params={"limit": 200}, headers=h).json()["data"]
    assert {j["id"] for j in listed} == ids
    return ids


def _wait_all(url: str, h: dict, n: int, timeout: float = 900) -> list[dict]:
    with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        deadline = time.monotonic() + timeout
        while True:
            jobs = c.get("/v1/jobs", params={"limit": 200}, headers=h).json()["data"]
            if len(jobs) == n and all(j["status"] in TERMINAL for j in jobs):
                return jobs
            assert time.monotonic() < deadline, [j["status"] for j in jobs]
            time.sleep(1)


def test_200_gets_and_100_submits_all_answered_listed_then_cancelled(load, key, tmp_path):
    """On a queue no worker reads (the default run; the slow test below runs every job)."""
    idle = load.model_copy(update={"queue_prefix": load.queue_prefix + "_idle"})
    api = ApiServer(idle, tmp_path)
    try:
        h = key
        ids = _submit_load(api.url, h)

        async def cancel_all():
            async with httpx.AsyncClient(base_url=api.url, timeout=TIMEOUT, limits=LIMITS) as c:
                return await asyncio.gather(*(c.post(f"/v1/jobs/{i}/cancel", headers=h) for i in ids))

        assert [r.status_code for r in asyncio.run(cancel_all())] == [202] * len(ids)
        assert [j["status"] for j in _wait_all(api.url, h, len(ids))] == ["cancelled"] * len(ids)
    finally:
        api.stop()


@pytest.mark.slow
def test_200_gets_and_100_submits_all_answered_listed_and_finished(stack, key):
    h = key
    ids = _submit_load(stack.url, h)
    assert [j["status"] for j in _wait_all(stack.url, h, len(ids))] == ["succeeded"] * len(ids)
