"""The service's one error hierarchy and its mapping to HTTP, installed in one place.

Every error body is `{"error": {"code", "message", ...}}`. welore_core errors map by their
`code`; request validation errors name each field and, where the schema has one, its range.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from welore_core.errors import WeloreError

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


class InvalidRequest(ServiceError):
    status, code = 422, "invalid_request"


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
        item = {"field": ".".join(loc) or "body", "message": err.get("msg", "invalid"),
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
            item["received"] = err["input"]
        out.append(item)
    return out


def install(app: FastAPI, param_schemas: dict[str, Any]) -> None:
    @app.exception_handler(ServiceError)
    async def _service(_: Request, exc: ServiceError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(error_body(exc.code, exc.message, **exc.extra), status_code=exc.status,
                            headers=headers)

    @app.exception_handler(WeloreError)
    async def _core(_: Request, exc: WeloreError):
        return JSONResponse(error_body(exc.code, exc.message), status_code=CORE_STATUS.get(exc.code, 500))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        fields = validation_fields(list(exc.errors()), param_schemas)
        message = "; ".join(f"{f['field']}: {f['message']}" + (f" (allowed: {f['allowed']})" if f.get("allowed") else "")
                            for f in fields)
        return JSONResponse(error_body("invalid_params", message, fields=fields), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body("internal_error", f"{type(exc).__name__}: {exc}"), status_code=500)
