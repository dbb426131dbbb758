"""The event bus: live job events, latest state and cancel flags.

An event is `{"seq": int, "type": "status"|"progress"|"metric"|"log", "time": iso8601,
"data": {...}}`; `seq` increases per job. `RedisEventBus` keeps one stream per job (entry id
`<seq>-1`, so reads resume after any seq) plus small keys for the latest state and the cancel
flag; `LocalEventBus` does the same in memory for the embedded server. The database holds the
durable copy (api/events/store.py): nothing depends on Redis keeping events. `read_many` serves
the API's fan-out (api/events/fanout.py): one reader for every followed job.

The bus also keeps a *sent mark* per job whose task message went to the broker (api/dispatch.py).
The broker is the same Redis, so a mark shares its message's fate: a restart without
persistence, a FLUSH or a failover that lost the message lost the mark too (Redis applies and
replicates writes in order, and the mark is written after the message). A queued job whose mark
is gone is sent again by the reaper; a job still marked is not, however long it waits. A worker
that took a message but could not claim its job (the database was down) removes the mark.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from typing import Optional, Protocol


class EventBus(Protocol):
    def publish(self, job_id: str, event: dict) -> None: ...
    def read(self, job_id: str, after_seq: int, timeout: float = 0.0) -> list[dict]: ...
    def read_many(self, cursors: dict[str, int], timeout: float = 0.0) -> dict[str, list[dict]]: ...
    def last_seq(self, job_id: str) -> int: ...
    def set_latest(self, job_id: str, state: dict) -> None: ...
    def latest(self, job_id: str) -> Optional[dict]: ...
    def request_cancel(self, job_id: str) -> None: ...
    def cancel_requested(self, job_id: str) -> bool: ...
    def finish(self, job_id: str) -> None: ...
    def mark_sent(self, job_id: str) -> None: ...
    def unmark_sent(self, job_id: str) -> None: ...
    def sent(self, job_ids: list[str]) -> set[str]: ...
    def ping(self) -> bool: ...


class LocalEventBus:
    """In-process bus for the embedded server (API threads and worker threads share it)."""

    def __init__(self, keep_jobs: int = 1000):
        self._cond = threading.Condition()
        self._events: dict[str, list[dict]] = defaultdict(list)
        self._latest: dict[str, dict] = {}
        self._cancel: set[str] = set()
        self._sent: set[str] = set()
        self._finished: list[str] = []
        self._keep = keep_jobs

    def publish(self, job_id: str, event: dict) -> None:
        with self._cond:
            events = self._events[job_id]
            if not events or event["seq"] > events[-1]["seq"]:
                events.append(event)
            self._cond.notify_all()

    def read(self, job_id: str, after_seq: int, timeout: float = 0.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                new = [e for e in self._events.get(job_id, ()) if e["seq"] > after_seq]
                left = deadline - time.monotonic()
                if new or left <= 0:
                    return new
                self._cond.wait(left)

    def read_many(self, cursors: dict[str, int], timeout: float = 0.0) -> dict[str, list[dict]]:
        """Events after each job's cursor, waiting up to `timeout` for the first one."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = {}
                for job_id, after in cursors.items():
                    new = [e for e in self._events.get(job_id, ()) if e["seq"] > after]
                    if new:
                        got[job_id] = new
                left = deadline - time.monotonic()
                if got or left <= 0:
                    return got
                self._cond.wait(left)

    def last_seq(self, job_id: str) -> int:
        with self._cond:
            events = self._events.get(job_id)
            return events[-1]["seq"] if events else -1

    def set_latest(self, job_id: str, state: dict) -> None:
        with self._cond:
            self._latest[job_id] = state

    def latest(self, job_id: str) -> Optional[dict]:
        with self._cond:
            return self._latest.get(job_id)

    def request_cancel(self, job_id: str) -> None:
        with self._cond:
            self._cancel.add(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        with self._cond:
            return job_id in self._cancel

    def finish(self, job_id: str) -> None:
        """Forget old finished jobs (the database has their events)."""
        with self._cond:
            self._cancel.discard(job_id)
            self._sent.discard(job_id)
            self._finished.append(job_id)
            while len(self._finished) > self._keep:
                old = self._finished.pop(0)
                self._events.pop(old, None)
                self._latest.pop(old, None)

    def mark_sent(self, job_id: str) -> None:
        with self._cond:
            self._sent.add(job_id)

    def unmark_sent(self, job_id: str) -> None:
        with self._cond:
            self._sent.discard(job_id)

    def sent(self, job_ids: list[str]) -> set[str]:
        with self._cond:
            return self._sent.intersection(job_ids)

    def ping(self) -> bool:
        return True


class RedisEventBus:
    """Redis streams + keys under `<prefix>:job:<id>:*`."""

    def __init__(self, url: str, prefix: str = "welore", ttl_s: int = 7 * 24 * 3600,
                 maxlen: int = 100_000):
        import redis

        self._redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=30,
                                           socket_connect_timeout=5, health_check_interval=30)
        self._prefix = prefix
        self._ttl = ttl_s
        self._maxlen = maxlen

    def _key(self, job_id: str, what: str) -> str:
        return f"{self._prefix}:job:{job_id}:{what}"

    def publish(self, job_id: str, event: dict) -> None:
        import redis

        try:
            self._redis.xadd(self._key(job_id, "events"), {"e": json.dumps(event)},
                             id=f"{int(event['seq'])}-1", maxlen=self._maxlen, approximate=True)
        except redis.ResponseError:
            pass  # an event with this or a later seq is already there (a redelivered task)

    def read(self, job_id: str, after_seq: int, timeout: float = 0.0) -> list[dict]:
        key = self._key(job_id, "events")
        start = f"{after_seq}-1" if after_seq >= 0 else "0-0"
        if timeout > 0:
            got = self._redis.xread({key: start}, block=int(timeout * 1000), count=10_000)
            entries = got[0][1] if got else []
        else:
            entries = self._redis.xrange(key, min=f"({start}" if after_seq >= 0 else "-", max="+")
        return [json.loads(fields["e"]) for _id, fields in entries]

    def read_many(self, cursors: dict[str, int], timeout: float = 0.0) -> dict[str, list[dict]]:
        """One XREAD over the streams of all `cursors` (the fan-out's single reader)."""
        if not cursors:
            return {}
        keys = {self._key(job_id, "events"): job_id for job_id in cursors}
        streams = {key: (f"{cursors[job_id]}-1" if cursors[job_id] >= 0 else "0-0") for key, job_id in keys.items()}
        got = self._redis.xread(streams, block=max(1, int(timeout * 1000)), count=10_000) or []
        return {keys[key]: [json.loads(fields["e"]) for _id, fields in entries] for key, entries in got if entries}

    def last_seq(self, job_id: str) -> int:
        last = self._redis.xrevrange(self._key(job_id, "events"), count=1)
        return int(last[0][0].split("-")[0]) if last else -1

    def set_latest(self, job_id: str, state: dict) -> None:
        self._redis.set(self._key(job_id, "latest"), json.dumps(state), ex=self._ttl)

    def latest(self, job_id: str) -> Optional[dict]:
        raw = self._redis.get(self._key(job_id, "latest"))
        return json.loads(raw) if raw else None

    def request_cancel(self, job_id: str) -> None:
        self._redis.set(self._key(job_id, "cancel"), "1", ex=self._ttl)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self._redis.exists(self._key(job_id, "cancel")))

    def finish(self, job_id: str) -> None:
        for what in ("events", "latest"):
            self._redis.expire(self._key(job_id, what), self._ttl)
        self._redis.delete(self._key(job_id, "cancel"), self._key(job_id, "sent"))

    def mark_sent(self, job_id: str) -> None:
        self._redis.set(self._key(job_id, "sent"), "1", ex=self._ttl)

    def unmark_sent(self, job_id: str) -> None:
        self._redis.delete(self._key(job_id, "sent"))

    def sent(self, job_ids: list[str]) -> set[str]:
        """Those of `job_ids` whose sent mark is still there (one round trip)."""
        pipe = self._redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.exists(self._key(job_id, "sent"))
        return {job_id for job_id, there in zip(job_ids, pipe.execute()) if there}

    def ping(self) -> bool:
        try:
            return bool(self._redis.ping())
        except Exception:
            return False

    def close(self) -> None:
        self._redis.close()


def make_bus(settings) -> EventBus:
    if settings.redis_url:
        return RedisEventBus(settings.redis_url, settings.queue_prefix, settings.event_ttl_s)
    return LocalEventBus()
