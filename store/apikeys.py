"""API keys: random bearer tokens of which only the sha256 is stored.

A key looks like ``src_<prefix>_<secret>``; ``prefix`` (8 hex chars) is stored in clear so a key can be
named in lists and logs without revealing it. Keys carry 256 bits of randomness, so an unsalted sha256
is enough (no password-hash stretching needed) and lookup is one indexed equality.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.tables import ApiKey, utcnow

KEY_SCHEME = "src"
WEBHOOK_SECRET_SCHEME = "whsec"


def hash_api_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode("utf-8")).hexdigest()


def generate_api_key() -> tuple[str, str]:
    """A fresh (raw_key, prefix)."""
    prefix = secrets.token_hex(4)
    return f"{KEY_SCHEME}_{prefix}_{secrets.token_urlsafe(32)}", prefix


def generate_webhook_secret() -> str:
    """A fresh secret that signs a key's webhooks (store.webhooks)."""
    return f"{WEBHOOK_SECRET_SCHEME}_{secrets.token_urlsafe(32)}"


def create_api_key(session: Session, name: str, *, now: datetime | None = None) -> tuple[ApiKey, str]:
    """Insert a key; returns the row and the raw key (shown to the user once, never stored). The row's
    ``webhook_secret`` is new too, and is shown with the key."""
    raw_key, prefix = generate_api_key()
    row = ApiKey(
        name=name,
        key_hash=hash_api_key(raw_key),
        prefix=prefix,
        created_at=now or utcnow(),
        webhook_secret=generate_webhook_secret(),
    )
    session.add(row)
    session.flush()
    return row, raw_key


def find_api_key(session: Session, raw_key: str) -> ApiKey | None:
    """The unrevoked key matching ``raw_key``, or None."""
    stmt = select(ApiKey).where(ApiKey.key_hash == hash_api_key(raw_key), ApiKey.revoked.is_(False))
    return session.execute(stmt).scalar_one_or_none()


def revoke_api_key(session: Session, key_id: str) -> bool:
    """Revoke a key by id; False if there is no such key."""
    row = session.get(ApiKey, key_id)
    if row is None:
        return False
    row.revoked = True
    session.flush()
    return True


def rotate_webhook_secret(session: Session, key_id: str) -> str | None:
    """Give an unrevoked key a new webhook secret and return it (None: no such key). Deliveries sent
    from now on are signed with it, retries of earlier events included."""
    row = session.get(ApiKey, key_id)
    if row is None or row.revoked:
        return None
    row.webhook_secret = generate_webhook_secret()
    session.flush()
    return row.webhook_secret
