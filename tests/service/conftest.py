"""Fixtures of the service tests, all against real servers: a Postgres database created for the
run (migrated with Alembic, dropped afterwards), a Redis database with a key prefix of its own,
a real `celery` worker process, a tiny model under a models directory, and two API keys.

Nothing here mocks Postgres, Redis or Celery. The embedded mode has its own tests
(test_service_embedded.py) that start `welore serve` with no configuration.
"""

from __future__ import annotations

import os
import random
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import make_client, service_env

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # tinymodel, client helpers

PG_ADMIN_URL = os.environ.get("WELORE_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_BASE = os.environ.get("WELORE_TEST_REDIS", "redis://127.0.0.1:6379")


def _pg_reachable() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return True
    except Exception:
        return False


def _redis_reachable() -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url(REDIS_BASE, socket_connect_timeout=3).ping())
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_url():
    """A fresh database `welore_test_<random>`, migrated to head with Alembic; dropped at the end."""
    if not _pg_reachable():
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL}; run scripts/services")
    import psycopg

    from api import migrate

    name = f"welore_test_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    url = f"{base.replace('postgresql://', 'postgresql+psycopg://', 1)}/{name}"
    try:
        migrate.upgrade(url)
        yield url
    finally:
        from api.db import dispose

        dispose(url)
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url():
    """A Redis database number picked at random (8-15) plus a unique key/queue prefix; our keys
    are deleted at the end."""
    if not _redis_reachable():
        pytest.fail(f"Redis is not reachable at {REDIS_BASE}; run scripts/services")
    yield f"{REDIS_BASE}/{random.randint(8, 15)}"


@pytest.fixture(scope="session")
def queue_prefix(redis_url):
    prefix = f"welore_test_{secrets.token_hex(4)}"
    yield prefix
    import redis

    r = redis.Redis.from_url(redis_url)
    for pattern in (f"{prefix}*", f"_kombu.binding.{prefix}*"):
        keys = list(r.scan_iter(match=pattern, count=1000))
        if keys:
            r.delete(*keys)
    r.close()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    from tinymodel import write_tiny_model

    d = tmp_path_factory.mktemp("models")
    write_tiny_model(d / "tiny")
    return d


@pytest.fixture(scope="session")
def artifact_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def settings(pg_url, redis_url, queue_prefix, artifact_dir, models_dir, tmp_path_factory):
    from api.settings import Settings

    return Settings(database_url=pg_url, redis_url=redis_url, artifact_dir=artifact_dir, models_dir=models_dir,
                    queue_prefix=queue_prefix, state_dir=tmp_path_factory.mktemp("state"), heartbeat_s=2.0,
                    upload_max_bytes=256 * 1024, artifact_min_free_mb=64)  # CI disks may hold little


@pytest.fixture(scope="session")
def celery_worker(settings, tmp_path_factory):
    """A real `celery worker` process (prefork, one child) on the tests' queues."""
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    queues = f"{settings.queue('gpu')},{settings.queue('light')}"
    cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", queues, "-c", "1",
           "-l", "info", "-n", f"{settings.queue_prefix}@%h", "--without-gossip", "--without-mingle",
           "--without-heartbeat"]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=HERE.parent.parent, env=service_env(settings), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while b" ready." not in log_path.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"celery worker did not start:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.2)
        proc.log_path = log_path
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # warm shutdown of the worker and its child
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="session")
def client(settings):
    with make_client(settings) as c:
        yield c


@pytest.fixture(scope="session")
def keys(settings):
    """Two API keys: jobs and files of one are invisible to the other."""
    from api.auth.keys import create_key
    from api.db import session_scope

    with session_scope(settings.db_url) as s:
        _, a = create_key(s, "tests A")
        _, b = create_key(s, "tests B")
    return {"A": {"Authorization": f"Bearer {a}"}, "B": {"Authorization": f"Bearer {b}"}}


@pytest.fixture
def key(settings):
    """A fresh API key per test, so listings see only that test's jobs."""
    from api.auth.keys import create_key
    from api.db import session_scope

    with session_scope(settings.db_url) as s:
        _, plain = create_key(s, "per-test")
    return {"Authorization": f"Bearer {plain}"}
