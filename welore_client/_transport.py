"""One httpx.Client with the API key, JSON error mapping and retries with backoff.

Retried: connection failures (refused, reset, a read that broke) and 502/503/504 (429 too,
honouring Retry-After), only for requests that are safe to repeat: GETs, cancels, and POSTs that
carry an Idempotency-Key. A submit without a key is sent once.
"""

from __future__ import annotations

import contextlib
import random
import time
from typing import Any, Iterator, Optional

import httpx

from . import errors

TRANSIENT_EXCEPTIONS = (httpx.TransportError,)  # connect/read/write errors, timeouts, protocol errors
RETRY_STATUS = (429, 502, 503, 504)


class Transport:
    def __init__(self, base_url: str, api_key: Optional[str], *, timeout: float = 60.0, max_retries: int = 4,
                 backoff_s: float = 0.5, transport: Optional[httpx.BaseTransport] = None):
        headers = {"User-Agent": "welore-client/0.1"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.base_url, self.max_retries, self.backoff_s = base_url.rstrip("/"), max_retries, backoff_s
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self.http.close()

    def delay(self, attempt: int, response: Optional[httpx.Response] = None) -> float:
        """Exponential backoff with jitter (attempt 0 → ~backoff_s), or the server's Retry-After."""
        if response is not None:
            after = response.headers.get("retry-after", "")
            if after.replace(".", "", 1).isdigit():
                return min(float(after), 60.0)
        return min(self.backoff_s * 2 ** attempt, 20.0) * (0.75 + random.random() / 2)

    def raise_for_error(self, r: httpx.Response) -> None:
        if r.status_code < 400:
            return
        if not r.is_stream_consumed:
            r.read()
        try:
            body = r.json()
        except ValueError:
            body = None
        raise errors.from_response(r.status_code, body, r.text)

    def connection_error(self, exc: Exception, method: str, path: str, attempts: int) -> errors.APIConnectionError:
        return errors.APIConnectionError(f"{method} {self.base_url}{path} failed after {attempts} attempt(s): "
                                         f"{type(exc).__name__}: {exc}. Is the server running there "
                                         "(set WELORE_API_URL or base_url=)?")

    def request(self, method: str, path: str, *, retry: bool = True, **kw: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                r = self.http.request(method, path, **kw)
            except TRANSIENT_EXCEPTIONS as exc:
                if not retry or attempt >= self.max_retries:
                    raise self.connection_error(exc, method, path, attempt + 1) from exc
                time.sleep(self.delay(attempt))
                attempt += 1
                continue
            if r.status_code in RETRY_STATUS and retry and attempt < self.max_retries:
                time.sleep(self.delay(attempt, r))
                attempt += 1
                continue
            self.raise_for_error(r)
            return r

    def json(self, method: str, path: str, **kw: Any) -> Any:
        return self.request(method, path, **kw).json()

    @contextlib.contextmanager
    def stream(self, method: str, path: str, **kw: Any) -> Iterator[httpx.Response]:
        """A streamed response, error statuses raised (callers do their own retrying)."""
        with self.http.stream(method, path, **kw) as r:
            self.raise_for_error(r)
            yield r
