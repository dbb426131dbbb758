"""The event fan-out: live events of followed jobs for every SSE follower of one API process,
read by ONE thread, so that a follower holds neither a thread nor a database connection.

Followers (async generators in the request's event loop) `subscribe` to a job and await their
asyncio queue. The fan-out thread reads the bus for all followed jobs at once
(`bus.read_many`) and hands each batch to the followers' queues. When the bus has been silent
for a job for `db_poll_s`, it reads the job's events from the database instead (the record, in
case the bus lost some) and, once the job has finished there, tells its followers `END`. Every
`key_check_s` it also reads which of the followers' API keys were revoked meanwhile and tells
their followers `REVOKED`: a revoked key's streams end within seconds, as its requests do.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from sqlalchemy import select

from ..db import session_scope
from ..models import ApiKey, Job
from . import store

log = logging.getLogger("welore.events")

END = object()  # the job finished and nothing more will come
REVOKED = object()  # the follower's API key was revoked: its stream ends


@dataclass(eq=False)
class Subscription:
    job_id: str
    key_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class FanOut:
    def __init__(self, settings, bus, db_poll_s: float = 2.0, read_timeout_s: float = 1.0, key_check_s: float = 2.0):
        self.settings, self.bus = settings, bus
        self.db_poll_s, self.read_timeout_s, self.key_check_s = db_poll_s, read_timeout_s, key_check_s
        self._keys_checked = time.monotonic()
        self._lock = threading.Lock()
        self._subs: dict[str, set[Subscription]] = {}
        self._cursor: dict[str, int] = {}  # per job: the last seq handed out
        self._last_seen: dict[str, float] = {}  # per job: when the bus or the database last gave events
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="welore-fanout")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        with self._lock:
            subs = [sub for group in self._subs.values() for sub in group]
        for sub in subs:  # followers still connected end their streams
            self._put(sub, END)

    def followers(self) -> int:
        with self._lock:
            return sum(len(g) for g in self._subs.values())

    def subscribe(self, job_id: str, after_seq: int, key_id: str) -> Subscription:
        """Live events of `job_id` with seq > `after_seq` (and possibly some before: skip those), for
        a follower authenticated with API key `key_id`."""
        sub = Subscription(job_id, key_id, asyncio.get_running_loop())
        with self._lock:
            if job_id not in self._subs:
                self._subs[job_id] = set()
                self._cursor[job_id] = after_seq
                self._last_seen[job_id] = time.monotonic()
            self._subs[job_id].add(sub)
        self._wake.set()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            group = self._subs.get(sub.job_id)
            if group is not None:
                group.discard(sub)
                if not group:
                    del self._subs[sub.job_id], self._cursor[sub.job_id], self._last_seen[sub.job_id]

    # -- the thread -----------------------------------------------------------------------
    @staticmethod
    def _put(sub: Subscription, item) -> None:
        try:
            sub.loop.call_soon_threadsafe(sub.queue.put_nowait, item)
        except RuntimeError:  # its event loop is closed
            pass

    def _deliver(self, job_id: str, events: list[dict]) -> None:
        with self._lock:
            if job_id not in self._subs:
                return
            events = [e for e in events if e["seq"] > self._cursor[job_id]]
            if not events:
                return
            self._cursor[job_id] = events[-1]["seq"]
            self._last_seen[job_id] = time.monotonic()
            subs = list(self._subs[job_id])
        for sub in subs:
            self._put(sub, events)

    def _end(self, job_id: str) -> None:
        with self._lock:
            subs = list(self._subs.get(job_id, ()))
        for sub in subs:
            self._put(sub, END)

    def _check_keys(self) -> None:
        """End the streams of followers whose API key was revoked (one query for all keys)."""
        with self._lock:
            subs = [sub for group in self._subs.values() for sub in group]
        if not subs:
            return
        with session_scope(self.settings.db_url) as s:
            revoked = set(s.scalars(select(ApiKey.id).where(ApiKey.id.in_({sub.key_id for sub in subs}),
                                                            ApiKey.revoked_at.is_not(None))))
        for sub in subs:
            if sub.key_id in revoked:
                self._put(sub, REVOKED)

    def _from_database(self, job_id: str, after: int) -> None:
        with session_scope(self.settings.db_url) as s:
            events = store.events_after(s, job_id, after)
            job = s.get(Job, job_id)
            finished = job is None or job.finished
        with self._lock:
            if job_id in self._last_seen:
                self._last_seen[job_id] = time.monotonic()
        if events:
            self._deliver(job_id, events)
        elif finished:
            self._end(job_id)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                cursors = dict(self._cursor)
                quiet = [j for j, t in self._last_seen.items() if time.monotonic() - t >= self.db_poll_s]
            if not cursors:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                got = self.bus.read_many(cursors, self.read_timeout_s)
            except Exception:
                log.warning("event bus read failed; followers fall back to the database", exc_info=True)
                got = {}
                self._stop.wait(self.read_timeout_s)
            for job_id, events in got.items():
                self._deliver(job_id, events)
            for job_id in quiet:
                if job_id in got:
                    continue
                try:
                    self._from_database(job_id, cursors[job_id])
                except Exception:
                    log.warning("could not read the events of %s from the database", job_id, exc_info=True)
            if time.monotonic() - self._keys_checked >= self.key_check_s:
                self._keys_checked = time.monotonic()
                try:
                    self._check_keys()
                except Exception:
                    log.warning("could not check the followers' API keys", exc_info=True)
