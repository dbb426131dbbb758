"""JSON request bodies hold text: a lone UTF-16 surrogate (`"\\ud800"` as an escape, or its bytes
ED A0 80, both of which Python's json decoder accepts) is refused with a 422 naming where it is,
when the body is decoded and before any route, database or file system sees it. Every router uses
`StrictJsonRoute`; `lone_surrogate` also serves other decoded JSON (signed link payloads)."""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Coroutine

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

_SURROGATE = re.compile("[\ud800-\udfff]")
_MAYBE = re.compile(rb"\\u[dD]|\xed[\xa0-\xbf]")  # in UTF-8 JSON: a \uD... escape, or a surrogate's bytes
MESSAGE = ("a lone UTF-16 surrogate is not text; send UTF-8 (an escaped pair such as \\ud83d\\ude00 is one "
           "character and is fine)")


def lone_surrogate(value: Any) -> tuple[tuple, str] | None:
    """(location, string) of a string or key in decoded JSON that holds a lone surrogate; else None.
    The decoder joins valid pairs, so any surrogate left is a lone one. Iterative, linear at any depth
    (each entry keeps a link to its parent's location, not a copy of it)."""
    stack: list[tuple[Any, Any]] = [(value, None)]  # (value, its location as (parent location, key))
    while stack:
        v, where = stack.pop()
        if isinstance(v, str):
            if not v.isascii() and _SURROGATE.search(v):
                return _path(where), v
        elif isinstance(v, dict):
            for k, item in v.items():
                if isinstance(k, str) and not k.isascii() and _SURROGATE.search(k):
                    return _path((where, k)), k
                stack.append((item, (where, k)))
        elif isinstance(v, list):
            stack.extend((item, (where, i)) for i, item in enumerate(v))
    return None


def _path(where) -> tuple:
    keys = []
    while where is not None:
        where, key = where
        keys.append(key)
    return tuple(reversed(keys))


def _declares_json(request: Request) -> bool:
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return ctype in ("", "application/json") or ctype.endswith("+json")


async def check_body(request: Request) -> None:
    """Raise a 422 for a JSON body holding a lone surrogate. A body that does not decode is left to
    FastAPI, which reports it as it always does."""
    if request.method not in ("POST", "PUT", "PATCH") or not _declares_json(request):
        return
    body = await request.body()  # cached: the route reads the same bytes
    if not body or (json.detect_encoding(body) == "utf-8" and not _MAYBE.search(body)):
        return  # no surrogate can be in it: the common case costs one scan
    try:
        decoded = json.loads(body)
    except (ValueError, RecursionError):
        return
    found = lone_surrogate(decoded)
    if found is not None:
        loc, text = found
        raise RequestValidationError([{"type": "string_unicode", "loc": ("body", *loc), "msg": MESSAGE,
                                       "input": text}])


class StrictJsonRoute(APIRoute):
    """An APIRoute whose JSON body (if it declares one: a route reading its own stream, like an
    upload, is left alone) is checked for lone surrogates before the route runs."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()
        if self.body_field is None:
            return handle

        async def strict(request: Request) -> Response:
            await check_body(request)
            return await handle(request)

        return strict
