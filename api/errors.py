"""The service's one error hierarchy and its mapping to HTTP, installed in one place.

Every error body is `{"error": {"code", "message", ...}}`. welore_core errors map by their
`code`; request validation errors name each field and, where the schema has one, its range.
"""

from __future__ import annotations

import logging
import math
import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from welore_core.errors import WeloreError

from .redact import redact

log = logging.getLogger("welore.api")


class ServiceError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, **extra: Any):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.extra = extra


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class Conflict(ServiceError):
    status, code = 409, "conflict"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class RangeNotSatisfiable(ServiceError):
    status, code = 416, "range_not_satisfiable"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class InvalidRequest(ServiceError):
    status, code = 422, "invalid_request"


class InsufficientStorage(ServiceError):
    status, code = 507, "disk_full"


class ServiceUnavailable(ServiceError):
    status, code = 503, "unavailable"


# welore_core error code → HTTP status
CORE_STATUS = {
    "model_not_found": 404,
    "data_not_found": 404,
    "invalid_argument": 422,
    "invalid_data": 422,
    "unsupported_model": 422,
    "corrupt_checkpoint": 422,
    "output_exists": 409,
    "cancelled": 409,
}


def error_body(code: str, message: str, **extra: Any) -> dict:
    return {"error": {"code": code, "message": message, **extra}}


class ErrorDetail(BaseModel):
    code: str
    message: str
    model_config = {"extra": "allow"}


class ErrorBody(BaseModel):
    """Every error response: `{"error": {"code", "message", ...}}`."""

    error: ErrorDetail


_DESCRIPTIONS = {
    400: "malformed request (e.g. a body that is not valid JSON)",
    401: "missing, invalid or revoked API key",
    404: "no such job, file, artifact or model (or it belongs to another key)",
    409: "conflict with the job's state (or an Idempotency-Key reused with another request)",
    413: "payload larger than the limit",
    415: "unsupported content type",
    416: "range not satisfiable",
    422: "invalid parameters: names each field and its allowed range",
    503: "a service the request needs (database, broker) is unreachable",
    507: "the artifact store is full: nothing of the request was kept",
}


def responses(*codes: int) -> dict:
    """OpenAPI `responses` for the error statuses an operation can return."""
    return {c: {"model": ErrorBody, "description": _DESCRIPTIONS[c]} for c in codes}


def _range_text(model_field: Any) -> str | None:
    """'0 < value < 1' from a pydantic field's annotated-types constraints, if any."""
    lo = hi = None
    for m in getattr(model_field, "metadata", []) or []:
        for attr, sym in (("gt", "<"), ("ge", "≤")):
            if getattr(m, attr, None) is not None:
                lo = f"{getattr(m, attr)} {sym} value"
        for attr, sym in (("lt", "<"), ("le", "≤")):
            if getattr(m, attr, None) is not None:
                hi = f"{sym} {getattr(m, attr)}"
    if lo and hi:
        return f"{lo} {hi}"
    if lo:
        return lo
    if hi:
        return f"value {hi}"
    return None


def validation_fields(errors: list[dict], schemas: dict[str, Any] | None = None) -> list[dict]:
    """Turn pydantic errors into [{field, message, allowed?}] with dotted field names."""
    schemas = schemas or {}
    out = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        # Discriminated unions put the tag in the location: body.compress.params.err
        if loc and loc[0] in schemas:
            schema = schemas[loc[0]]
            loc = loc[1:]
        else:
            schema = None
        item = {"field": _printable(".".join(loc)) or "body", "message": err.get("msg", "invalid"),
                "type": err.get("type")}
        if schema is not None and len(loc) == 2 and loc[0] == "params":
            info = schema.model_fields.get(loc[1])
            allowed = _range_text(info) if info is not None else None
            if allowed:
                item["allowed"] = allowed
            elif err.get("type") == "extra_forbidden":
                item["allowed"] = "one of " + ", ".join(sorted(schema.model_fields))
        if err.get("type") in ("literal_error", "enum") and err.get("ctx", {}).get("expected"):
            item["allowed"] = err["ctx"]["expected"]
        if "input" in err and not isinstance(err["input"], (dict, list)):
            item["received"] = _json_safe(err["input"])
        out.append(item)
    return out


def _printable(text: str) -> str:
    """`text` as UTF-8 can carry it: a lone surrogate becomes its escape, the six characters `\\ud800`."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _json_safe(value: Any) -> Any:
    """A received value as JSON can carry it: NaN/±inf and bytes as text, long strings cut."""
    if value is None or isinstance(value, bool) or (isinstance(value, int) and abs(value) < 2**63):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return _printable(value if len(value) <= 200 else value[:200] + "…")
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "…"


def _settings(request: Request):
    return getattr(request.app.state, "settings", None)


def install(app: FastAPI, param_schemas: dict[str, Any]) -> None:
    """Map every error to `{"error": {code, message}}`; messages never carry SQL or server paths."""
    from sqlalchemy.exc import DataError, DBAPIError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if exc.status == 416 and "size" in exc.extra:
            headers = {"Content-Range": f"bytes */{exc.extra['size']}"}
        return JSONResponse(error_body(exc.code, redact(exc.message, _settings(request)), **exc.extra),
                            status_code=exc.status, headers=headers)

    @app.exception_handler(WeloreError)
    async def _core(request: Request, exc: WeloreError):
        return JSONResponse(error_body(exc.code, redact(exc.message, _settings(request))),
                            status_code=CORE_STATUS.get(exc.code, 500))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = list(exc.errors())
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if any(e.get("loc", ())[:1] == ("body",) for e in errors) and request.method in ("POST", "PUT", "PATCH") \
                and ctype not in ("application/json", "") and not ctype.endswith("+json"):
            return JSONResponse(error_body(UnsupportedMediaType.code, f"this endpoint takes a JSON body: send "
                                           f"'Content-Type: application/json' (got {ctype[:60]!r})"),
                                status_code=UnsupportedMediaType.status)
        fields = validation_fields(errors, param_schemas)
        message = "; ".join(f"{f['field']}: {f['message']}" + (f" (allowed: {f['allowed']})" if f.get("allowed") else "")
                            for f in fields)
        return JSONResponse(error_body("invalid_params", redact(message, _settings(request)), fields=fields),
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(DataError)
    async def _data(_: Request, exc: DataError):  # a value the database cannot store (a safety net)
        log.warning("database refused a value: %s", str(exc).splitlines()[0][:300])
        return JSONResponse(error_body("invalid_input", "a value in the request cannot be stored (control "
                                       "characters? out of range?); check the request's strings and numbers"),
                            status_code=422)

    async def _unavailable(_: Request, exc: Exception):
        log.warning("database unavailable: %s", type(exc).__name__)
        return JSONResponse(error_body("database_unavailable", "the database is unreachable or busy; retry "
                                       "shortly"), status_code=503, headers={"Retry-After": "5"})

    for cls in (OperationalError, PoolTimeout):
        app.add_exception_handler(cls, _unavailable)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        ref = secrets.token_hex(4)
        if isinstance(exc, DBAPIError):
            log.error("database error %s: %s", ref, type(exc).__name__)
        else:
            log.exception("unhandled error %s", ref)
        return JSONResponse(error_body("internal_error", f"an internal error occurred (reference {ref} in the "
                                       "server log)"), status_code=500)
