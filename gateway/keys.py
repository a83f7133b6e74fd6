"""Which key a request presents: the config file's keys (read at start) and the ledger
database's (`greenroute keys`, shared by every replica).

A database key is looked up by its digest on every request that presents one, so a key revoked
on any replica is refused by all of them from their next request, and no cache can lag. The
lookup is one primary-key read; it runs on a worker thread so a slow database never blocks the
event loop. Config keys are a dict read, and a gateway whose database holds no key never asks
it: whether it does is re-read in the background (`refresh`, each limits sync), so a key made
while the gateway runs works within one sync interval.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from greenroute.gateway.config import KeyConfig, key_digests
from greenroute.gateway.errors import APIError
from greenroute.gateway.ledger import keys as stored
from greenroute.gateway.ledger import store

log = logging.getLogger("greenroute.keys")


@dataclass(frozen=True, slots=True)
class Key:
    """A valid key: its id (the ledger's key_id), whether it is an admin key, its limits."""

    id: str
    admin: bool = False
    rpm: int | None = None
    tpm: int | None = None
    joules_per_day: float | None = None

    @property
    def limited(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.joules_per_day is not None


class KeyStore:
    """The gateway's keys; `engine` is the ledger database's (None: config keys only)."""

    def __init__(self, config_keys: tuple[KeyConfig, ...], engine: Engine | None) -> None:
        by_id = {key.id: key for key in config_keys}
        self.by_digest = {digest: _from_config(by_id[key_id])
                        for digest, key_id in key_digests(config_keys).items()}
        self.config_admins = sum(key.admin for key in config_keys)
        self.engine = engine
        self._migrated = False
        # Active database keys and admin keys at the last refresh; None: not known (the
        # database could not be read), which counts as "there may be some".
        self.database_keys: int | None = 0 if engine is None else None
        self.database_admins: int | None = 0 if engine is None else None

    @property
    def required(self) -> bool:
        """Whether requests need a key: some key is configured, or may be."""
        return bool(self.by_digest) or self.database_keys != 0

    @property
    def has_admins(self) -> bool:
        return self.config_admins > 0 or self.database_admins != 0

    def refresh(self) -> None:
        """Re-read how many database keys there are (blocking: call it off the event loop)."""
        if self.engine is None:
            return
        try:
            self._migrate()
            with self.engine.connect() as connection:
                self.database_keys, self.database_admins = stored.active_counts(connection)
        except (SQLAlchemyError, store.LedgerError) as exc:
            log.error("keys: cannot read the ledger database's keys: %s",
                      f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            if self.database_keys == 0:
                return  # it had none a moment ago; a database that is away made none since
            self.database_keys = self.database_admins = None

    async def lookup(self, token: str) -> Key | None:
        """The key whose secret is `token`; None for no key, an unknown or a revoked one."""
        digest = hashlib.sha256(token.encode()).digest()
        key = self.by_digest.get(digest)
        if key is not None or self.engine is None or self.database_keys == 0:
            return key
        try:
            return await asyncio.to_thread(self._find, digest.hex())
        except (SQLAlchemyError, store.LedgerError):
            log.exception("keys: key lookup failed")
            raise APIError(503, "The gateway cannot check API keys right now; retry.",
                           type="server_error", code="key_store_unavailable") from None

    def _find(self, digest: str) -> Key | None:
        assert self.engine is not None
        self._migrate()
        with self.engine.connect() as connection:
            found = stored.find(connection, digest)
        if found is None:
            return None
        return Key(found.id, found.admin, found.rpm, found.tpm, found.joules_per_day)

    def _migrate(self) -> None:
        if not self._migrated and self.engine is not None:
            store.migrate(self.engine)
            self._migrated = True


def _from_config(key: KeyConfig) -> Key:
    return Key(key.id, key.admin, key.rpm, key.tpm, key.joules_per_day)
