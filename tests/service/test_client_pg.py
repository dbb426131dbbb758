"""welore_client against the production setup: the API as `welore serve` (uvicorn, a real process) on a
Postgres database, Redis, and a real Celery worker process (fixtures in conftest.py). The same
checks as the embedded test (client_checks.py)."""

from __future__ import annotations

import pytest

from procs import ApiServer
from welore_client import Client

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def api_url(settings, celery_worker, tmp_path_factory):
    api = ApiServer(settings, tmp_path_factory.mktemp("api-logs"))  # `welore serve` on Postgres + Redis
    try:
        yield api.url
    finally:
        api.stop()


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
