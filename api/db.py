"""Engines and sessions, one engine per (process, URL): SQLite gets WAL and a busy timeout so
the embedded server's request threads and worker threads can share it; Postgres pings
connections before use. Engines are rebuilt after a fork (Celery's prefork children).

Sessions are short: `session_scope` around the queries of one step, never around a whole
request or stream. The pool size comes from the one setting `api_concurrency` (see
`Settings.db_pool_size`), and there is no overflow: a process never opens more connections than
that, and since request threads are as many as pooled connections, no thread waits for one."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

_lock = threading.Lock()
_engines: dict[tuple[int, str], tuple[Engine, sessionmaker]] = {}
DEFAULT_POOL_SIZE = 35  # Settings().db_pool_size with the default api_concurrency


def _make_engine(url: str, pool_size: int) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               pool_size=pool_size, max_overflow=0, pool_timeout=60)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=0, pool_timeout=60)


def engine_for(url: str, pool_size: int | None = None) -> tuple[Engine, sessionmaker]:
    """The process's engine for `url`; `pool_size` applies when it is created here."""
    key = (os.getpid(), url)
    with _lock:
        if key not in _engines:
            engine = _make_engine(url, pool_size or DEFAULT_POOL_SIZE)
            _engines[key] = (engine, sessionmaker(engine, expire_on_commit=False))
        return _engines[key]


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    _, factory = engine_for(url)
    with factory() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def dispose(url: str) -> None:
    with _lock:
        entry = _engines.pop((os.getpid(), url), None)
    if entry:
        entry[0].dispose()
