"""API key generation and storage: keys are random 256-bit tokens shown once; the database keeps
only their SHA-256 (a fast hash is right for high-entropy secrets)."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..models import ApiKey, new_id, utcnow

PREFIX = "wl_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, name: str = "") -> tuple[ApiKey, str]:
    """A new key row (committed by the caller) and the plaintext key."""
    plain = PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(id=new_id("key"), name=name, key_hash=hash_key(plain))
    session.add(row)
    return row, plain


def authenticate(session: Session, plain: str) -> ApiKey | None:
    if not plain.startswith(PREFIX):
        return None
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(plain)))
    if row is None or row.revoked_at is not None:
        return None
    return row


def count_keys(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(ApiKey)) or 0)


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def revoke(session: Session, key_id: str) -> bool:
    row = session.get(ApiKey, key_id)
    if row is None:
        return False
    row.revoked_at = row.revoked_at or utcnow()
    return True
