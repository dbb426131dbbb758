"""Signed, expiring download links (for browsers, which cannot put an Authorization header on a
plain link): a token names a key, a job, an artifact and an expiry, signed with HMAC-SHA256 under
that key's stored hash. It stops working when it expires or its key is revoked; no new secret is
kept anywhere."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

from sqlalchemy.orm import Session

from ..models import ApiKey

DEFAULT_TTL_S = 600


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


def verify_token(session: Session, token: str) -> tuple[ApiKey, str, str] | None:
    """→ (key, job id, artifact name) for a valid, unexpired token of an active key; else None."""
    payload, _, sig = token.partition(".")
    try:
        data = json.loads(_unb64(payload))
        key_id, job_id, name, exp = str(data["k"]), str(data["j"]), str(data["n"]), int(data["e"])
    except (ValueError, KeyError, TypeError):
        return None
    key = session.get(ApiKey, key_id)
    if key is None or key.revoked_at is not None or exp < time.time():
        return None
    if not hmac.compare_digest(sig, _sign(key, payload)):
        return None
    return key, job_id, name
