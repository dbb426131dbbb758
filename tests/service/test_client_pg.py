"""welore_client against the production setup: the API under uvicorn (a real process) on a
Postgres database, Redis, and a real Celery worker process (fixtures in conftest.py). The same
checks as the embedded test (client_checks.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from embedded_server import ROOT, free_port
from helpers import service_env
from welore_client import Client

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def api_url(settings, celery_worker, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("uvicorn") / "api.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--host", "127.0.0.1",
                             "--port", str(port)], cwd=ROOT, env=service_env(settings), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def client(api_url, settings):
    from api.auth.keys import create_key
    from api.db import session_scope

    with session_scope(settings.db_url) as s:
        _, key = create_key(s, "client tests")
    with Client(api_url, api_key=key) as c:
        yield c


# the tests themselves (client_checks.py), run here against this module's `client`
from client_checks import (compressed, test_cancel, test_error_mapping, test_events_reconnect_with_last_event_id,  # noqa: E402,F401
                           test_pagination, test_resume_partial_download, test_retries_only_when_safe,
                           test_submit_events_wait_download)
