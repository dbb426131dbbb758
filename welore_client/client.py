"""`Client`: the entry point of the welore Python client."""

from __future__ import annotations

import os
from typing import Optional

import httpx

from ._transport import Transport
from .catalog import Files, Models
from .jobs import Jobs

DEFAULT_URL = "http://127.0.0.1:8000"


class Client:
    """A client of a welore server.

    `base_url` defaults to $WELORE_API_URL (else http://127.0.0.1:8000), `api_key` to
    $WELORE_API_KEY. Transient failures (connection reset, 502/503/504) are retried up to
    `max_retries` times with exponential backoff from `backoff_s`. `transport` is passed to
    httpx (a proxy, or a test's transport).
    """

    def __init__(self, base_url: Optional[str] = None, api_key: Optional[str] = None, *, timeout: float = 60.0,
                 max_retries: int = 4, backoff_s: float = 0.5, transport: Optional[httpx.BaseTransport] = None):
        base_url = base_url or os.environ.get("WELORE_API_URL") or DEFAULT_URL
        api_key = api_key if api_key is not None else os.environ.get("WELORE_API_KEY")
        self._transport = Transport(base_url, api_key, timeout=timeout, max_retries=max_retries,
                                    backoff_s=backoff_s, transport=transport)
        self.base_url = self._transport.base_url
        self.jobs = Jobs(self._transport)
        self.files = Files(self._transport)
        self.models = Models(self._transport)

    def health(self) -> dict:
        return self._transport.json("GET", "/readyz")

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
