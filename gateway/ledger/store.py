"""Opening the ledger database: SQLite by default (WAL), any SQLAlchemy URL otherwise; and its
migrations.

A fresh database gets the current tables and is stamped with the latest version. An existing
one is upgraded by running, in order, each migration newer than its stamp, in one transaction
per step: columns are added and data moved, never dropped. A database stamped newer than this
code is refused, rather than written with the wrong shape. The versions live in a one-column
table, `ledger_version`: no migration tool and its config files for a handful of steps.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlmodel import SQLModel

from greenroute.gateway.ledger import schema

DATA_ENV = "GREENROUTE_DATA_DIR"

# Migration N (1-based) takes a database from version N to N + 1. Append, never edit.
Migration = Callable[[Connection], None]


def _add_router_score(connection: Connection) -> None:
    """1 -> 2: `requests.router_score`, model `green`'s router score. The column reached the
    models without a migration, so ledgers stamped 1 exist both with it and without it."""
    if "router_score" not in {c["name"] for c in inspect(connection).get_columns("requests")}:
        connection.execute(text("ALTER TABLE requests ADD COLUMN router_score FLOAT"))


def _add_keys_and_usage(connection: Connection) -> None:
    """2 -> 3: `api_keys` (keys made by `greenroute keys`) and `key_usage` (their rate-limit
    and energy-budget counters, shared by replicas)."""
    new = (schema.ApiKeyRow, schema.KeyUsageRow)
    tables = [model.__table__ for model in new]  # type: ignore[union-attr]
    SQLModel.metadata.create_all(connection, tables=tables)


def _add_carbon_columns(connection: Connection) -> None:
    """3 -> 4: each request's grid intensity and gCO2 at its time, and the target rule that
    changed its quality target (gateway/carbon.py). Rows from before keep NULL: `report`
    prices those at its grid intensity."""
    for column, kind in (("grid_gco2_per_kwh", "FLOAT"), ("gco2", "FLOAT"),
                         ("target_rule", "VARCHAR(64)")):
        connection.execute(text(f"ALTER TABLE requests ADD COLUMN {column} {kind}"))


def _add_other_clients(connection: Connection) -> None:
    """4 -> 5: `device_energy.other_j`, energy the device's server spent on other clients
    (other gateway processes) by its own token counters; 0 for rows from before."""
    connection.execute(text(
        "ALTER TABLE device_energy ADD COLUMN other_j FLOAT NOT NULL DEFAULT 0"))


def _add_readers(connection: Connection) -> None:
    """5 -> 6: `device_energy.host` and `.reader`, the process that read the counter, so a
    ledger shared by several readers of one device counts its energy once; '' for rows from
    before, which count as one reader."""
    for column in ("host", "reader"):
        connection.execute(text(
            f"ALTER TABLE device_energy ADD COLUMN {column} VARCHAR(255) NOT NULL DEFAULT ''"))


MIGRATIONS: list[Migration] = [_add_router_score, _add_keys_and_usage, _add_carbon_columns,
                               _add_other_clients, _add_readers]
BASE_VERSION = 1  # the schema the first release created (tests/test_ledger.py keeps its DDL)
MIGRATION_LOCK = 0x6772_6e72  # Postgres advisory lock key held while migrating ("grnr")


class LedgerError(RuntimeError):
    """The ledger database cannot be used (wrong version, bad URL)."""


def latest_version() -> int:
    return BASE_VERSION + len(MIGRATIONS)


def default_path() -> Path:
    """$GREENROUTE_DATA_DIR/ledger.db, else ~/.local/share/greenroute/ledger.db."""
    base = os.environ.get(DATA_ENV) or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "greenroute")
    return Path(base) / "ledger.db"


def database_url(path: str | Path | None = None, url: str | None = None) -> str:
    """The SQLAlchemy URL for a configured url, path, or the default path."""
    if url:
        return url
    return f"sqlite:///{Path(path).expanduser() if path else default_path()}"


def sqlite_path(url: str) -> Path | None:
    """The file of a sqlite:/// URL; None for other databases and in-memory SQLite."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def open_engine(url: str, *, read_only: bool = False, busy_timeout_ms: int = 2000) -> Engine:
    """An engine for `url`. SQLite: WAL journal (readers never block the writer), a short busy
    timeout (the writer retries on its own schedule), read-only URI mode for reports."""
    path = sqlite_path(url)
    if path is None:
        engine = create_engine(url, pool_pre_ping=True)
        if read_only and engine.dialect.name == "postgresql":
            engine = engine.execution_options(postgresql_readonly=True)
        return engine
    if read_only:
        if not path.exists():
            raise LedgerError(f"no ledger at {path}")
        engine = create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def _pragmas(connection, _record) -> None:  # type: ignore[no-untyped-def]
        cursor = connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        if not read_only:
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    return engine


def current_version(connection: Connection) -> int | None:
    """The database's schema version; None for a database with no ledger yet."""
    if not inspect(connection).has_table("ledger_version"):
        return None
    return connection.execute(text("SELECT max(version) FROM ledger_version")).scalar()


def migrate(engine: Engine) -> int:
    """Create or upgrade the ledger's tables; return the version it is now at.

    Each step runs in its own transaction and reads the version again inside it. On Postgres
    the transaction first takes an advisory lock, so replicas starting together migrate one
    after the other instead of racing to create the same tables (SQLite's writer lock already
    serialises them)."""
    while True:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                   {"key": MIGRATION_LOCK})
            version = current_version(connection)
            if version is None:
                tables = [m.__table__ for m in schema.TABLES.values()]  # type: ignore[attr-defined]
                SQLModel.metadata.create_all(connection, tables=tables)
                connection.execute(text("CREATE TABLE ledger_version (version INTEGER NOT NULL)"))
                connection.execute(text("INSERT INTO ledger_version VALUES (:v)"),
                                   {"v": latest_version()})
                return latest_version()
            if version > latest_version():
                raise LedgerError(f"the ledger is at schema version {version}, newer than this "
                                  f"GreenRoute's {latest_version()}: upgrade GreenRoute")
            if version == latest_version():
                return version
            MIGRATIONS[version - BASE_VERSION](connection)
            connection.execute(text("INSERT INTO ledger_version VALUES (:v)"), {"v": version + 1})
