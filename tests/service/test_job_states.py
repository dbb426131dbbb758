"""The job state machine (api/jobs/states.py) and the reaper against the real Postgres: guarded
transitions (two claimers, one winner), heartbeats bound to the claim, the reaper's requeue /
fail / cancel, a redelivered task that takes over from a dead runner but leaves a live one
alone, a graceful hand-back that gives its attempt back, and the sweep of dead attempts' files."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest

from helpers import make_client

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def fast(settings):
    """Settings with a short heartbeat timeout and a queue no worker reads."""
    return settings.model_copy(update={"queue_prefix": settings.queue_prefix + "_states", "heartbeat_s": 0.3,
                                       "heartbeat_timeout_s": 2.0, "max_attempts": 2})


@pytest.fixture(scope="module")
def app(fast):
    with make_client(fast) as c:
        yield c


def _job(app, key, **params) -> str:
    r = app.post("/v1/jobs", json={"type": "evaluate", "model": "tiny",
                                   "params": {"data": "boolq", "seq_len": 8, "windows": 1, **params}}, headers=key)
    assert r.status_code == 202, r.json()
    return r.json()["id"]


def _row(settings, job_id):
    from api.db import session_scope
    from api.models import Job

    with session_scope(settings.db_url) as s:
        return s.get(Job, job_id)


def _claim(settings, job_id, runner):
    from api.db import session_scope
    from api.jobs import states

    with session_scope(settings.db_url) as s:
        t, why = states.claim(s, None, job_id, runner, settings.max_attempts)
        return (t.job.attempts if t is not None and not why else None), why


def _age(settings, job_id, seconds):
    from api.db import session_scope
    from api.models import Job, ReaperWatch, utcnow

    with session_scope(settings.db_url) as s:
        s.get(Job, job_id).heartbeat_at = utcnow() - dt.timedelta(seconds=seconds)
        watch = s.get(ReaperWatch, 1)  # and the reapers have watched the heartbeats as long
        watch.watching_since, watch.last_pass_at = utcnow() - dt.timedelta(seconds=seconds), utcnow()


def test_two_claimers_one_winner(app, key, fast):
    job_id = _job(app, key)
    results = []
    barrier = threading.Barrier(8)

    def go(i):
        barrier.wait()
        results.append(_claim(fast, job_id, f"r{i}"))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(r[0] for r in results if r[0] is not None) == [1]
    assert sorted(r[1] for r in results) == [""] + ["running"] * 7
    row = _row(fast, job_id)
    assert row.status == "running" and row.attempts == 1 and row.runner.startswith("r")


def test_heartbeats_belong_to_the_claim(app, key, fast):
    from api.db import session_scope
    from api.jobs import states

    job_id = _job(app, key)
    _claim(fast, job_id, "mine")
    with session_scope(fast.db_url) as s:
        assert states.progress(s, job_id, "mine", progress=0.5) is not None
        assert states.progress(s, job_id, "someone-else", progress=0.9) is None
        assert states.finish(s, job_id, "someone-else", states.SUCCEEDED, 99) is None
    assert _row(fast, job_id).progress == 0.5


def test_reaper_requeues_then_fails_and_cancels(app, key, fast):
    """(The app's own reaper thread runs too: whichever pass comes first does it, once.)"""
    from api.jobs.reaper import reap_once
    from worker.runner import bus_for

    bus = bus_for(fast)
    lost, cancelled = _job(app, key), _job(app, key)
    for job_id in (lost, cancelled):
        _claim(fast, job_id, "dead")
        _age(fast, job_id, 10)
    assert app.post(f"/v1/jobs/{cancelled}/cancel", headers=key).json()["cancel_requested"]
    reap_once(fast, bus, lambda j, q: None)
    assert _row(fast, lost).status == "queued" and _row(fast, cancelled).status == "cancelled"
    assert _row(fast, lost).attempts == 1 and _row(fast, lost).runner is None
    # the second attempt's worker is lost too: max_attempts (2) spent → failed worker_lost
    assert _claim(fast, lost, "dead-again") == (2, "")
    _age(fast, lost, 10)
    reap_once(fast, bus, lambda j, q: None)
    job = app.get(f"/v1/jobs/{lost}", headers=key).json()
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost"
    assert "2 attempts" in job["error"]["message"]
    events = app.get(f"/v1/jobs/{lost}/events", params={"format": "json"}, headers=key).json()
    assert [e["data"]["status"] for e in events if e["type"] == "status"] == [
        "queued", "running", "queued", "running", "failed"]


def test_the_reaper_re_enqueues_what_it_requeues(app, key, fast):
    import json

    import redis

    from api.jobs.reaper import reap_once
    from worker.runner import bus_for

    job_id = _job(app, key)
    r = redis.Redis.from_url(fast.redis_url)
    queue = fast.queue("gpu")
    r.delete(queue)
    _claim(fast, job_id, "dead")
    _age(fast, job_id, 10)
    reap_once(fast, bus_for(fast), app.app.state.dispatcher.enqueue)
    messages = [json.loads(m) for m in r.lrange(queue, 0, -1)]
    r.close()
    assert [m["headers"]["task"] for m in messages if job_id in m["headers"]["argsrepr"]] == ["welore.run_job"]


def test_graceful_hand_back_gives_the_attempt_back(app, key, fast):
    from api.db import session_scope
    from api.jobs import states

    job_id = _job(app, key)
    for _ in range(3):  # more hand-backs than max_attempts: none of them spends an attempt
        assert _claim(fast, job_id, "w")[1] == ""
        with session_scope(fast.db_url) as s:
            seq = states.next_seq(s, None, job_id)
            assert states.requeue(s, job_id, "w", seq, give_back_attempt=True, reason="worker shutdown")
        assert _row(fast, job_id).attempts == 0 and _row(fast, job_id).status == "queued"


def test_a_redelivered_task_takes_over_from_a_dead_runner_only(app, key, fast):
    """run_job on a job another runner holds: while that runner's heartbeat moves it leaves the job
    alone; when the heartbeat stops it takes the job over within the heartbeat timeout and runs it."""
    from api.db import session_scope
    from api.jobs import states
    from worker.runner import bus_for, run_job

    bus = bus_for(fast)
    alive = _job(app, key)
    _claim(fast, alive, "alive")
    stop = threading.Event()

    def beat():
        while not stop.wait(0.2):
            with session_scope(fast.db_url) as s:
                states.heartbeat(s, alive, "alive")

    t = threading.Thread(target=beat)
    t.start()
    try:
        assert run_job(alive, fast, bus) == "running elsewhere"
    finally:
        stop.set()
        t.join()
    assert _row(fast, alive).runner == "alive"

    dead = _job(app, key)
    _claim(fast, dead, "dead")  # a fresh heartbeat, then nothing: the runner was killed
    t0 = time.monotonic()
    assert run_job(dead, fast, bus) == "succeeded"
    assert time.monotonic() - t0 < fast.heartbeat_timeout_s + fast.heartbeat_s + 30
    row = _row(fast, dead)
    assert row.status == "succeeded" and row.attempts == 2 and row.runner != "dead"


def test_sweep_removes_dead_attempts_files_only(app, key, fast):
    from api import storage
    from api.jobs.reaper import reap_once
    from worker.runner import bus_for

    running, finished = _job(app, key), _job(app, key)
    _claim(fast, running, "w")
    app.post(f"/v1/jobs/{finished}/cancel", headers=key)
    tmp = storage.tmp_dir(fast)
    for name in (f"{running}.aaaa", f"{finished}.bbbb"):
        (tmp / name).mkdir()
        (tmp / name / "half.safetensors").write_bytes(b"x" * 1000)
    reap_once(fast, bus_for(fast), lambda j, q: None)
    assert (tmp / f"{running}.aaaa").is_dir() and not (tmp / f"{finished}.bbbb").exists()


def test_a_job_handed_back_while_the_broker_was_down_is_sent_by_the_reaper(app, key, fast):
    """A hand-back (or a reaping) whose enqueue fails leaves the job queued with no task message:
    it stays marked undispatched, and the reaper sends it once the heartbeat timeout has passed."""
    import json

    import redis

    from api.db import session_scope
    from api.dispatch import dispatch
    from api.jobs import states
    from api.jobs.reaper import reap_once
    from api.models import Job, utcnow
    from worker.runner import bus_for

    job_id = _job(app, key)
    assert _row(fast, job_id).undispatched_since is None  # the submit sent it
    _claim(fast, job_id, "w")
    with session_scope(fast.db_url) as s:
        assert states.requeue(s, job_id, "w", states.next_seq(s, None, job_id), give_back_attempt=True,
                              reason="worker shutdown")

    def broker_down(job_id, queue):
        raise ConnectionError("broker down")

    with pytest.raises(ConnectionError):
        dispatch(fast.db_url, bus_for(fast), broker_down, job_id, "q")
    assert _row(fast, job_id).status == "queued" and _row(fast, job_id).undispatched_since is not None
    r = redis.Redis.from_url(fast.redis_url)
    queue = fast.queue("gpu")
    r.delete(queue)
    with session_scope(fast.db_url) as s:  # as if the timeout had passed
        s.get(Job, job_id).undispatched_since = utcnow() - dt.timedelta(seconds=10)
    reap_once(fast, bus_for(fast), app.app.state.dispatcher.enqueue)
    messages = [json.loads(m) for m in r.lrange(queue, 0, -1)]
    r.close()
    assert any(job_id in m["headers"]["argsrepr"] for m in messages)
    row = _row(fast, job_id)
    assert row.status == "queued" and row.undispatched_since is None


def _messages(fast, job_id) -> int:
    import json

    import redis

    r = redis.Redis.from_url(fast.redis_url)
    try:
        return sum(job_id in json.loads(m)["headers"]["argsrepr"] for m in r.lrange(fast.queue("gpu"), 0, -1))
    finally:
        r.close()


def test_the_reaper_re_sends_a_queued_job_whose_message_the_broker_lost(app, key, fast):
    """A dispatched job's sent mark lives in the broker's Redis: a job whose mark is gone (the broker
    lost its message) is sent again, one whose mark is there is not, however long it waits."""
    import redis

    from api.jobs.reaper import reap_once
    from worker.runner import bus_for

    lost, waiting = _job(app, key), _job(app, key)
    assert _messages(fast, lost) == _messages(fast, waiting) == 1
    r = redis.Redis.from_url(fast.redis_url)
    r.delete(fast.queue("gpu"), f"{fast.queue_prefix}:job:{lost}:sent")  # what a FLUSH does to this job
    r.close()
    reap_once(fast, bus_for(fast), app.app.state.dispatcher.enqueue)
    reap_once(fast, bus_for(fast), app.app.state.dispatcher.enqueue)  # sent once, not once per pass
    assert (_messages(fast, lost), _messages(fast, waiting)) == (1, 0)
    assert bus_for(fast).sent([lost, waiting]) == {lost, waiting}
    assert _row(fast, lost).status == "queued" and _row(fast, lost).undispatched_since is None


def test_a_gap_in_the_reapers_watch_is_not_a_lost_heartbeat(app, key, fast):
    """After the reapers could not read the database for longer than half the heartbeat timeout (an
    outage), a running job whose heartbeat is old is left alone until a full timeout has been watched."""
    from api.db import session_scope
    from api.jobs.reaper import reap_once
    from api.models import Job, ReaperWatch, utcnow
    from worker.runner import bus_for

    job_id = _job(app, key)
    _claim(fast, job_id, "alive-but-cut-off")
    with session_scope(fast.db_url) as s:  # no heartbeat and no reaper pass for 10 s: the database was down
        s.get(Job, job_id).heartbeat_at = s.get(ReaperWatch, 1).last_pass_at = utcnow() - dt.timedelta(seconds=10)
    assert reap_once(fast, bus_for(fast), lambda j, q: None) == []
    assert _row(fast, job_id).status == "running" and _row(fast, job_id).runner == "alive-but-cut-off"
    _age(fast, job_id, 10)  # its worker stays silent while the reapers watch a full timeout
    reap_once(fast, bus_for(fast), lambda j, q: None)
    assert _row(fast, job_id).status == "queued" and _row(fast, job_id).attempts == 1
