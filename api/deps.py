"""`Annotated` dependencies shared by the routes: settings, short database sessions, the event
bus, its fan-out, the dispatcher, the caller's API key (Bearer auth, always on), and the types
of ids in paths and queries.

No dependency holds a database session across a request: `DbDep` gives a factory of short
sessions (`with db() as s:` around the queries of one step), and authentication uses its own.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from functools import partial
from typing import Annotated, Callable

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from .auth.keys import authenticate
from .db import session_scope
from .errors import Unauthorized
from .events.bus import EventBus
from .events.fanout import FanOut
from .models import ID_PATTERN, ApiKey
from .settings import Settings

JobId = Annotated[str, Path(pattern=ID_PATTERN, max_length=64, description="a job id (job_...)")]
FileId = Annotated[str, Path(pattern=ID_PATTERN, max_length=64, description="a file id (file_...)")]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_db(request: Request) -> Callable[[], AbstractContextManager[Session]]:
    return partial(session_scope, request.app.state.settings.db_url)


def get_bus(request: Request) -> EventBus:
    return request.app.state.bus


def get_fanout(request: Request) -> FanOut:
    return request.app.state.fanout


def get_dispatcher(request: Request):
    return request.app.state.dispatcher


SettingsDep = Annotated[Settings, Depends(get_settings)]
DbDep = Annotated[Callable[[], AbstractContextManager[Session]], Depends(get_db)]
BusDep = Annotated[EventBus, Depends(get_bus)]
FanOutDep = Annotated[FanOut, Depends(get_fanout)]
DispatcherDep = Annotated[object, Depends(get_dispatcher)]

_bearer = HTTPBearer(auto_error=False, description="an API key from `welore keys create`")


def current_key(db: DbDep, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> ApiKey:
    if creds is None or creds.scheme.lower() != "bearer":
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' (create one with "
                           "`welore keys create`)")
    with db() as session:
        key = authenticate(session, creds.credentials)
    if key is None:
        raise Unauthorized("invalid or revoked API key")
    return key


CurrentKey = Annotated[ApiKey, Depends(current_key)]
