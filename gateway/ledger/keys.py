"""Client keys kept in the ledger database (`greenroute keys`), so every replica that shares
the database sees the same keys, and a revoked key at once.

Only the SHA-256 of a secret is stored. A password needs a slow, salted hash (bcrypt, scrypt,
Argon2) because people choose passwords from a space small enough to try in order; these
secrets are 32 random bytes from `secrets` (256 bits), so a stolen digest can only be reversed
by trying on the order of 2**255 candidates, at any hash speed. A fast hash then costs nothing
in safety and keeps the per-request lookup a primary-key read of one row. The same digest is
what the gateway computes for the key a request presents; gateway/config.py (`key_digests`)
says why looking a digest up is constant-time enough.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, Row, func, insert, select, update

from greenroute.gateway.ledger.schema import ApiKeyRow

KEY_PREFIX = "gr-"  # tells a GreenRoute key apart in a config file or a leaked-secret scan
SECRET_BYTES = 32
_TABLE = ApiKeyRow.__table__  # type: ignore[attr-defined]


class KeyStoreError(ValueError):
    """A key operation that cannot be done: an id in use, an unknown id."""


@dataclass(frozen=True)
class StoredKey:
    """A key's record, without its digest: what `keys list` shows and the gateway enforces."""

    id: str
    created: datetime
    revoked: datetime | None
    admin: bool
    rpm: int | None
    tpm: int | None
    joules_per_day: float | None


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


def digest_of(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create(engine: Engine, key_id: str, *, admin: bool = False, rpm: int | None = None,
           tpm: int | None = None, joules_per_day: float | None = None) -> str:
    """Store a new key and return its secret: the only time anyone sees it."""
    secret = new_secret()
    with engine.begin() as connection:
        if connection.execute(select(_TABLE.c.id).where(_TABLE.c.id == key_id)).first():
            raise KeyStoreError(f"a key with id {key_id!r} exists already (revoked ids are "
                                "kept, so a report never mixes two clients under one id)")
        connection.execute(insert(_TABLE).values(
            digest=digest_of(secret), id=key_id, created=datetime.now(UTC), revoked=None,
            admin=admin, rpm=rpm, tpm=tpm, joules_per_day=joules_per_day))
    return secret


def revoke(engine: Engine, key_id: str) -> datetime:
    """Revoke a key; every gateway refuses it from its next request. Returns when it was
    revoked (the first time, for a key revoked already)."""
    with engine.begin() as connection:
        row = connection.execute(select(_TABLE.c.revoked).where(_TABLE.c.id == key_id)).first()
        if row is None:
            raise KeyStoreError(f"no key with id {key_id!r}")
        if row.revoked is not None:
            return _utc(row.revoked)
        now = datetime.now(UTC)
        connection.execute(update(_TABLE).where(_TABLE.c.id == key_id).values(revoked=now))
        return now


def list_keys(engine: Engine) -> list[StoredKey]:
    with engine.connect() as connection:
        rows = connection.execute(select(*_columns()).order_by(_TABLE.c.created)).all()
    return [_stored(row) for row in rows]


def find(connection: Connection, digest: str) -> StoredKey | None:
    """The key with this digest unless it is revoked: one primary-key read."""
    row = connection.execute(select(*_columns()).where(_TABLE.c.digest == digest)).first()
    if row is None or row.revoked is not None:
        return None
    return _stored(row)


def active_counts(connection: Connection) -> tuple[int, int]:
    """How many keys are not revoked, and how many of them are admin keys."""
    active = _TABLE.c.revoked.is_(None)
    keys, admins = connection.execute(select(
        func.count(), func.count().filter(_TABLE.c.admin.is_(True))).where(active)).one()
    return int(keys), int(admins)


def _columns() -> list[Any]:
    c = _TABLE.c
    return [c.id, c.created, c.revoked, c.admin, c.rpm, c.tpm, c.joules_per_day]


def _stored(row: Row[Any]) -> StoredKey:
    r = row._mapping
    return StoredKey(id=r["id"], created=_utc(r["created"]),
                     revoked=_utc(r["revoked"]) if r["revoked"] is not None else None,
                     admin=bool(r["admin"]), rpm=r["rpm"], tpm=r["tpm"],
                     joules_per_day=r["joules_per_day"])


def _utc(moment: datetime) -> datetime:
    """SQLite gives back naive datetimes; every time here is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
