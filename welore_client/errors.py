"""Exceptions of the welore client. Every error the API returns becomes an `APIError` (or one
of its subclasses, chosen by HTTP status) carrying the API's `code`, `message` and `status`."""

from __future__ import annotations

from typing import Any, Optional


class WeloreClientError(Exception):
    """Base of every error raised by welore_client."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class APIConnectionError(WeloreClientError):
    """The server could not be reached (or the connection broke) and retrying did not help."""


class WaitTimeout(WeloreClientError):
    """`jobs.wait` gave up before the job finished; `.job` is its last known state."""

    def __init__(self, message: str, job: Any = None):
        super().__init__(message)
        self.job = job


class ChecksumMismatch(WeloreClientError):
    """A downloaded file's SHA-256 differs from the one the server recorded (it was not kept)."""


class APIError(WeloreClientError):
    """An error response: `{"error": {"code", "message", ...}}` with HTTP `status`."""

    def __init__(self, status: int, code: str, message: str, body: Optional[dict] = None):
        super().__init__(message)
        self.status, self.code, self.body = status, code, body or {}

    @property
    def details(self) -> dict:
        """Everything in the error object beyond code and message (e.g. `fields` of a 422)."""
        err = self.body.get("error") if isinstance(self.body.get("error"), dict) else {}
        return {k: v for k, v in err.items() if k not in ("code", "message")}

    def __str__(self) -> str:
        return f"{self.message} (HTTP {self.status} {self.code})"


class BadRequestError(APIError):
    pass


class AuthenticationError(APIError):
    pass


class PermissionDeniedError(APIError):
    pass


class NotFoundError(APIError):
    pass


class ConflictError(APIError):
    pass


class PayloadTooLargeError(APIError):
    pass


class ValidationError(APIError):
    """422: `fields` lists {field, message, allowed?, received?} for each invalid field."""

    @property
    def fields(self) -> list[dict]:
        return list(self.details.get("fields") or [])


class RateLimitError(APIError):
    pass


class ServerError(APIError):
    pass


class ServiceUnavailableError(ServerError):
    pass


_BY_STATUS = {400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
              409: ConflictError, 413: PayloadTooLargeError, 422: ValidationError, 429: RateLimitError,
              503: ServiceUnavailableError}


def from_response(status: int, body: Any, fallback_text: str = "") -> APIError:
    """The exception for an error response (any body: the API's envelope, or a proxy's page)."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        code, message = str(err.get("code") or "error"), str(err.get("message") or "")
    else:
        code, message = f"http_{status}", (fallback_text.strip()[:500] or f"HTTP {status}")
        body = {}
    if status == 401:
        message += " (give the key as api_key= or in WELORE_API_KEY)"
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else APIError)
    return cls(status, code, message, body)
