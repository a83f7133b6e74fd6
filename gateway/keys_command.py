"""`greenroute keys create|list|revoke`: client keys in the ledger database, which every
gateway replica sharing it reads (gateway/keys.py), so a key made or revoked here takes effect
on all of them without a restart."""

from __future__ import annotations

import argparse
import json
import sys

from sqlalchemy import Engine

from greenroute.gateway.config import CONFIG_ENV, ConfigError, load_config
from greenroute.gateway.ledger import keys, store


def add_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = commands.add_parser(
        "keys", help="create, list and revoke API keys in the ledger database",
        description="API keys kept in the ledger database (the gateway's [ledger] path or "
                    "url), shared by every replica. Only each key's SHA-256 is stored; the key "
                    "itself is printed once, by `create`.")
    actions = parser.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="make a key and print it (once)")
    create.add_argument("--id", required=True, dest="key_id",
                        help="the key's name: what the ledger and reports show")
    create.add_argument("--rpm", type=_positive_int, help="requests per minute")
    create.add_argument("--tpm", type=_positive_int,
                        help="tokens (prompt + completion) per minute")
    create.add_argument("--joules-per-day", type=_positive_float, metavar="J",
                        help="energy budget per UTC day, in joules")
    create.add_argument("--admin", action="store_true",
                        help="an admin key: the one that sees /health's details and /metrics")
    listing = actions.add_parser("list", help="ids, creation, revocation and limits (never "
                                              "the keys or their digests)")
    listing.add_argument("--format", choices=("table", "json"), default="table")
    revoke = actions.add_parser("revoke", help="revoke a key: every replica refuses it from "
                                               "its next request")
    revoke.add_argument("key_id", metavar="ID")
    for action in (create, listing, revoke):
        action.add_argument("--db", metavar="PATH|URL", help="ledger database: a SQLite file "
                            "or a SQLAlchemy URL (default: the config's [ledger], else the "
                            "default path)")
        action.add_argument("--config", metavar="PATH",
                            help=f"gateway config whose [ledger] to use (default: ${CONFIG_ENV})")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        url = _database(args)
        engine = store.open_engine(url)
        try:
            store.migrate(engine)
            return _ACTIONS[args.action](engine, args)
        finally:
            engine.dispose()
    except (ConfigError, keys.KeyStoreError, store.LedgerError) as exc:
        print(f"greenroute keys: {exc}", file=sys.stderr)
        return 1


def _create(engine: Engine, args: argparse.Namespace) -> int:
    secret = keys.create(engine, args.key_id, admin=args.admin,
                         rpm=args.rpm, tpm=args.tpm, joules_per_day=args.joules_per_day)
    print(secret)
    print(f"key {args.key_id!r} created; this is the only time it is shown: store it now",
          file=sys.stderr)
    return 0


def _list(engine: Engine, args: argparse.Namespace) -> int:
    found = keys.list_keys(engine)
    rows = [{"id": k.id, "created": k.created.isoformat(timespec="seconds"),
             "revoked": k.revoked.isoformat(timespec="seconds") if k.revoked else None,
             "admin": k.admin, "rpm": k.rpm, "tpm": k.tpm, "joules_per_day": k.joules_per_day}
            for k in found]
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    columns = ("id", "created", "revoked", "admin", "rpm", "tpm", "joules_per_day")
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    for line in ([list(columns)], cells):
        for row in line:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _revoke(engine: Engine, args: argparse.Namespace) -> int:
    when = keys.revoke(engine, args.key_id)
    print(f"key {args.key_id!r} revoked at {when.isoformat(timespec='seconds')}")
    return 0


_ACTIONS = {"create": _create, "list": _list, "revoke": _revoke}


def _database(args: argparse.Namespace) -> str:
    if args.db:
        return str(args.db) if "://" in args.db else store.database_url(path=args.db)
    ledger = load_config(args.config).ledger
    return store.database_url(ledger.path, ledger.url)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value
