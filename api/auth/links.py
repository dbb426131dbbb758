"""Signed, expiring download links (for browsers, which cannot put an Authorization header on a
plain link): a token names a key, a job, an artifact and an expiry, signed with HMAC-SHA256 under
that key's stored hash. It stops working when it expires or its key is revoked; no new secret is
kept anywhere."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time

from sqlalchemy.orm import Session

from ..models import ID_PATTERN, ApiKey
from ..strictjson import lone_surrogate

DEFAULT_TTL_S = 600
_ID = re.compile(ID_PATTERN)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(key: ApiKey, payload: str) -> str:
    return _b64(hmac.new(key.key_hash.encode(), payload.encode(), hashlib.sha256).digest())


def make_token(key: ApiKey, job_id: str, name: str, ttl_s: int = DEFAULT_TTL_S) -> tuple[str, int]:
    """→ (token, expiry as Unix seconds)."""
    exp = int(time.time()) + ttl_s
    payload = _b64(json.dumps({"k": key.id, "j": job_id, "n": name, "e": exp}, separators=(",", ":")).encode())
    return f"{payload}.{_sign(key, payload)}", exp


def _claims(payload: str) -> tuple[str, str, str, int] | None:
    """(key id, job id, name, expiry) of a payload shaped as `make_token` writes it; else None.
    Anyone can send a token: whatever it decodes to is checked, never trusted, and never raises."""
    try:
        data = json.loads(_unb64(payload))
    except (ValueError, RecursionError):  # not base64, UTF-8 or JSON; an integer too long; nested too deep
        return None
    if not isinstance(data, dict):
        return None
    key_id, job_id, name, exp = (data.get(f) for f in "kjne")
    if not all(isinstance(i, str) and _ID.fullmatch(i) for i in (key_id, job_id)):
        return None
    if not isinstance(name, str) or lone_surrogate(name) is not None or type(exp) is not int:
        return None
    return key_id, job_id, name, exp


def verify_token(session: Session, token: str) -> tuple[ApiKey, str, str] | None:
    """→ (key, job id, artifact name) for a valid, unexpired token of an active key; else None."""
    payload, _, sig = token.partition(".")
    claims = _claims(payload)
    if claims is None or not sig.isascii():
        return None
    key_id, job_id, name, exp = claims
    key = session.get(ApiKey, key_id)
    if key is None or key.revoked_at is not None or exp < time.time():
        return None
    if not hmac.compare_digest(sig, _sign(key, payload)):
        return None
    return key, job_id, name
