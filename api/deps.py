"""`Annotated` dependencies shared by the routes: settings, a database session, the event bus,
the dispatcher, and the caller's API key (Bearer auth, always on)."""

from __future__ import annotations

from typing import Annotated, Iterator

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from .auth.keys import authenticate
from .db import session_scope
from .errors import Unauthorized
from .events.bus import EventBus
from .models import ApiKey
from .settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with session_scope(request.app.state.settings.db_url) as session:
        yield session


def get_bus(request: Request) -> EventBus:
    return request.app.state.bus


def get_dispatcher(request: Request):
    return request.app.state.dispatcher


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
BusDep = Annotated[EventBus, Depends(get_bus)]
DispatcherDep = Annotated[object, Depends(get_dispatcher)]

_bearer = HTTPBearer(auto_error=False, description="an API key from `welore keys create`")


def current_key(session: SessionDep,
                creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> ApiKey:
    if creds is None or creds.scheme.lower() != "bearer":
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' (create one with "
                           "`welore keys create`)")
    key = authenticate(session, creds.credentials)
    if key is None:
        raise Unauthorized("invalid or revoked API key")
    return key


CurrentKey = Annotated[ApiKey, Depends(current_key)]
