"""`greenroute report`: energy totals and breakdowns from the ledger, read-only.

Figures: joules attributed to requests, joules per output token, Wh per 1,000 requests, gCO2 at
a grid intensity (config or flag; default Ember's world average), the devices' idle energy and
the energy-efficiency ratio (attributed / measured), and the savings against sending every
request to the largest tier. That counterfactual prices each request's output tokens at the
largest tier's joules per output token *as measured in this ledger*; the report says which tier
that is and where its figure comes from, and gives none when it has never been measured.
Every figure carries its energy source: an `estimate` is never presented as a measurement.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col

from greenroute.gateway import labels
from greenroute.gateway.carbon import GridIntensity
from greenroute.gateway.config import (
    CONFIG_ENV,
    ConfigError,
    EnergyConfig,
    GatewayConfig,
    load_config,
)
from greenroute.gateway.device_totals import count_devices
from greenroute.gateway.ledger import store
from greenroute.gateway.ledger.schema import AttemptRow, DeviceEnergyRow, RequestRow

DIMENSIONS = ("model", "route", "key", "day", "hour")
J_PER_KWH = 3.6e6
_SPAN = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def add_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = commands.add_parser(
        "report", help="energy report from the ledger (read-only)",
        description="Totals and breakdowns of the energy ledger over a time window: requests, "
                    "tokens, joules (attributed to requests; idle apart), joules per output "
                    "token, Wh per 1k requests, gCO2, and the savings against always using the "
                    "largest tier. Opens the database read-only.",
        epilog="examples:\n  greenroute report --since 24h\n"
               "  greenroute report --from 2025-01-01 --to 2025-02-01 --by model,day "
               "--format csv\n  greenroute report --since 7d --plot energy.png\n"
               "  greenroute report --labels --outcomes evals/outcomes/embedded.jsonl "
               "--plot labels.png",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", metavar="PATH|URL", help="ledger database: a SQLite file or a "
                        "SQLAlchemy URL (default: the config's [ledger], else the default path)")
    parser.add_argument("--config", metavar="PATH", help=f"gateway config (default: "
                        f"${CONFIG_ENV}, else the embedded default): ledger, tiers, grid")
    window = parser.add_argument_group("time window (UTC; default: everything)")
    window.add_argument("--since", metavar="SPAN", help="the last SPAN: 90s, 30m, 24h, 7d, 2w")
    window.add_argument("--from", dest="start", metavar="TIME", help="ISO 8601 start")
    window.add_argument("--to", dest="end", metavar="TIME", help="ISO 8601 end (exclusive)")
    parser.add_argument("--by", default="model,route,key,day",
                        help=f"breakdowns, comma-separated from {', '.join(DIMENSIONS)} "
                             "(default: model,route,key,day)")
    parser.add_argument("--grid-intensity", type=float, metavar="GCO2_PER_KWH",
                        help="re-price every row at this grid carbon intensity (default: "
                             "each row's own, stored at its time from the config's [energy] "
                             "grid_intensity file or grid_gco2_per_kwh; 436, Ember's world "
                             "average, for rows that have none)")
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table")
    parser.add_argument("--plot", metavar="PNG", help="also draw energy over time and joules "
                        "per token by model into this PNG (with --labels: the cards; needs "
                        "matplotlib)")
    label_options = parser.add_argument_group("energy labels")
    label_options.add_argument("--labels", action="store_true",
                        help="instead of the report, one card per tier: Wh per 1k requests "
                             "and per 1k output tokens, gCO2 per 1k requests, a rating from A "
                             "to E against the most efficient tier, the energy source")
    label_options.add_argument("--outcomes", metavar="PATH",
                        help="with --labels: an outcome table (greenroute collect) whose "
                             "mean quality per model goes on the matching tier's card")
    parser.set_defaults(handler=run)


# -- the window -------------------------------------------------------------------------------

def parse_time(text: str) -> datetime:
    """An ISO 8601 time, in UTC (a time without a zone is taken as UTC)."""
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def parse_span(text: str) -> timedelta:
    match = _SPAN.match(text.strip())
    if match is None:
        raise ValueError(f"bad span {text!r}: use a number and s, m, h, d or w (e.g. 24h)")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def window(since: str | None, start: str | None, end: str | None,
           now: datetime | None = None) -> tuple[datetime | None, datetime | None]:
    now = now or datetime.now(UTC)
    if since and start:
        raise ValueError("give --since or --from, not both")
    stop = parse_time(end) if end else None
    if since:
        return (stop or now) - parse_span(since), stop
    return (parse_time(start) if start else None), stop


# -- reading the ledger -----------------------------------------------------------------------

@dataclass
class Ledger:
    requests: list[RequestRow]
    attempts: list[AttemptRow]
    devices: list[DeviceEnergyRow]


def _between(column: Any, start: datetime | None, end: datetime | None) -> list[Any]:
    conditions = []
    if start is not None:
        conditions.append(column >= start)
    if end is not None:
        conditions.append(column < end)
    return conditions


def read_ledger(engine: Engine, start: datetime | None, end: datetime | None) -> Ledger:
    with engine.connect() as connection:
        if store.current_version(connection) is None:
            raise store.LedgerError("this database has no GreenRoute ledger")
        requests = [RequestRow.model_validate(r._mapping) for r in connection.execute(
            select(RequestRow).where(*_between(RequestRow.created, start, end))
            .order_by(col(RequestRow.created)))]
        ids = {r.id for r in requests}
        attempts = [AttemptRow.model_validate(r._mapping) for r in connection.execute(
            select(AttemptRow).join(RequestRow, col(RequestRow.id) == col(AttemptRow.request_id))
            .where(*_between(RequestRow.created, start, end)))]
        devices = [DeviceEnergyRow.model_validate(r._mapping) for r in connection.execute(
            select(DeviceEnergyRow).where(*_between(DeviceEnergyRow.started, start, end))
            .order_by(col(DeviceEnergyRow.started)))]
    assert all(a.request_id in ids for a in attempts)
    return Ledger(requests, attempts, devices)


def all_attempts_of(engine: Engine, tier: str) -> list[AttemptRow]:
    with engine.connect() as connection:
        return [AttemptRow.model_validate(r._mapping) for r in connection.execute(
            select(AttemptRow).where(col(AttemptRow.tier) == tier))]


# -- figures ----------------------------------------------------------------------------------

def summarize(rows: Sequence[RequestRow], grid: float) -> dict[str, Any]:
    """The figures of one group of requests."""
    metered = [r for r in rows if r.joules is not None]
    joules = sum(r.joules for r in metered if r.joules is not None)
    output = sum(r.completion_tokens or 0 for r in metered)
    return {
        "requests": len(rows),
        "errors": sum(1 for r in rows if r.status >= 400),
        "prompt_tokens": sum(r.prompt_tokens or 0 for r in rows),
        "completion_tokens": sum(r.completion_tokens or 0 for r in rows),
        "metered_requests": len(metered),
        "joules": joules,
        "joules_per_token": joules / output if output else None,
        "wh_per_1k_requests": joules / 3600 / len(metered) * 1000 if metered else None,
        "gco2": sum(_gco2(r, grid) for r in metered),
        "energy_sources": sorted({r.energy_source for r in metered if r.energy_source}),
    }


def _gco2(row: RequestRow, grid: float) -> float:
    """The row's gCO2 at its own time's intensity, as the gateway stored it; a row from before
    that (or re-priced with --grid-intensity: its gco2 cleared) at `grid`."""
    if row.gco2 is not None:
        return row.gco2
    return (row.joules or 0.0) / J_PER_KWH * grid


def _key(row: RequestRow, dimension: str) -> str:
    if dimension == "model":
        return row.answered_by or "(none)"
    if dimension == "route":
        return row.route or "(none)"
    if dimension == "key":
        return row.key_id or "(no key)"
    if dimension == "day":
        return row.created.strftime("%Y-%m-%d")
    return row.created.strftime("%Y-%m-%d %H:00")


def breakdown(rows: Iterable[RequestRow], dimension: str, grid: float) -> list[dict[str, Any]]:
    groups: dict[str, list[RequestRow]] = defaultdict(list)
    for row in rows:
        groups[_key(row, dimension)].append(row)
    return [{dimension: key, **summarize(group, grid)} for key, group in sorted(groups.items())]


def _joules_per_output_token(attempts: Iterable[AttemptRow]) -> tuple[float | None, int]:
    metered = [a for a in attempts if a.joules is not None and a.completion_tokens]
    tokens = sum(a.completion_tokens or 0 for a in metered)
    return (sum(a.joules or 0.0 for a in metered) / tokens if tokens else None), len(metered)


def savings(ledger: Ledger, largest: str | None, how: str, engine: Engine) -> dict[str, Any]:
    """Actual energy against every answered, metered request going to the largest tier."""
    result: dict[str, Any] = {"largest_tier": largest, "largest_chosen_by": how}
    if largest is None:
        return {**result, "note": "no tier to compare with"}
    per_token, samples = _joules_per_output_token(a for a in ledger.attempts if a.tier == largest)
    basis = "its metered requests in this window"
    if per_token is None:
        per_token, samples = _joules_per_output_token(all_attempts_of(engine, largest))
        basis = "its metered requests at any time in the ledger (none in this window)"
    if per_token is None:
        return {**result, "note": f"no measured requests of {largest!r} in the ledger: its "
                                  "joules per token are unknown, so savings are not computed"}
    rows = [r for r in ledger.requests if r.joules is not None and r.completion_tokens]
    actual = sum(r.joules or 0.0 for r in rows)
    counterfactual = sum((r.completion_tokens or 0) * per_token for r in rows)
    saved = counterfactual - actual
    return {**result, "largest_joules_per_token": per_token,
            "largest_joules_per_token_from": f"{samples} of {basis}",
            "requests_compared": len(rows), "actual_joules": actual,
            "counterfactual_joules": counterfactual, "saved_joules": saved,
            "saved_percent": 100 * saved / counterfactual if counterfactual else None}


def build_report(ledger: Ledger, engine: Engine, *, grid: float, dimensions: Sequence[str],
                 largest: str | None, largest_how: str, start: datetime | None,
                 end: datetime | None, database: str,
                 series: GridIntensity | None = None) -> dict[str, Any]:
    """`series`: the grid's intensity over time, for the idle energy of each device period
    (request rows carry their own gCO2); without it, `grid` prices it."""
    series = series or GridIntensity.constant(grid)
    totals = summarize(ledger.requests, grid)
    counted = count_devices(ledger.devices)  # a counter read by several processes once
    measured = sum(d.measured_j for d in counted)
    attributed = sum(d.attributed_j for d in counted)
    idle = sum(d.idle_j for d in counted)
    idle_gco2 = sum(series.gco2(row.idle_j * share, row.started)
                    for d in counted for row, share in d.counted)
    other = sum(d.other_j for d in counted)  # the servers' other clients
    own = measured - other
    totals.update(device_measured_joules=measured, device_attributed_joules=attributed,
                  idle_joules=idle, idle_gco2=idle_gco2, other_clients_joules=other,
                  efficiency_ratio=attributed / own if own > 0 else None)
    devices = [{"device": d.device, "source": d.source, "host": d.host or None,
                "readers": len(d.readers), "measured_joules": d.measured_j,
                "attributed_joules": d.attributed_j, "idle_joules": d.idle_j,
                "other_clients_joules": d.other_j} for d in counted]
    return {
        "database": database,
        "window": {"from": start.isoformat() if start else None,
                   "to": end.isoformat() if end else None},
        "grid_gco2_per_kwh": grid,
        "grid_intensity": series.source,
        "totals": totals,
        "breakdowns": {d: breakdown(ledger.requests, d, grid) for d in dimensions},
        "devices": devices,
        "savings": savings(ledger, largest, largest_how, engine),
    }


# -- output -----------------------------------------------------------------------------------

def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, list):
        return ",".join(value) or "-"
    return f"{value:,}" if isinstance(value, int) else str(value)


COLUMNS = (("requests", "requests"), ("errors", "errors"), ("prompt_tokens", "prompt tok"),
           ("completion_tokens", "output tok"), ("joules", "joules"),
           ("joules_per_token", "J/token"), ("wh_per_1k_requests", "Wh/1k req"),
           ("gco2", "gCO2"), ("energy_sources", "source"))


def render_table(report: dict[str, Any], out: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out, width=120)
    window = report["window"]
    console.print(f"[bold]GreenRoute energy report[/bold]  {report['database']}  from "
                  f"{window['from'] or 'the start'} to {window['to'] or 'now'} (UTC); grid "
                  f"{_grid_text(report['grid_intensity'])}")
    totals = report["totals"]
    table = Table(title="totals")
    for _, label in COLUMNS:
        table.add_column(label, justify="right")
    table.add_row(*(_fmt(totals[k]) for k, _ in COLUMNS))
    console.print(table)
    console.print(f"devices: measured {_fmt(totals['device_measured_joules'])} J, attributed "
                  f"{_fmt(totals['device_attributed_joules'])} J, idle "
                  f"{_fmt(totals['idle_joules'])} J ({_fmt(totals['idle_gco2'])} gCO2), "
                  f"other clients {_fmt(totals['other_clients_joules'])} J; "
                  f"efficiency ratio (attributed / (measured - other clients)) "
                  f"{_fmt(totals['efficiency_ratio'])}")
    for dimension, groups in report["breakdowns"].items():
        table = Table(title=f"by {dimension}")
        table.add_column(dimension)
        for _, label in COLUMNS:
            table.add_column(label, justify="right")
        for group in groups:
            table.add_row(group[dimension], *(_fmt(group[k]) for k, _ in COLUMNS))
        console.print(table)
    s = report["savings"]
    if "saved_joules" in s:
        console.print(
            f"savings vs always {s['largest_tier']!r} (largest by {s['largest_chosen_by']}; "
            f"{_fmt(s['largest_joules_per_token'], 4)} J/output token from "
            f"{s['largest_joules_per_token_from']}): actual {_fmt(s['actual_joules'])} J, "
            f"counterfactual {_fmt(s['counterfactual_joules'])} J, saved "
            f"{_fmt(s['saved_joules'])} J ({_fmt(s['saved_percent'], 1)}%)")
    else:
        console.print(f"savings: {s.get('note')}")
    if "estimate" in totals["energy_sources"]:
        console.print("note: 'estimate' rows are CPU time x watts per core, not a measured "
                      "counter (docs/energy.md)")


def _grid_text(source: str) -> str:
    """A constant ("436 gCO2/kWh"), or the file whose readings priced each row at its time."""
    return source if source.endswith("gCO2/kWh") else f"readings in {source} (each request " \
        "at its own time's intensity)"


def render_csv(report: dict[str, Any], out: Any) -> None:
    writer = csv.writer(out)
    keys = [k for k, _ in COLUMNS]
    writer.writerow(["dimension", "group", *keys])
    writer.writerow(["total", "", *(_csv(report["totals"][k]) for k in keys)])
    for dimension, groups in report["breakdowns"].items():
        for group in groups:
            writer.writerow([dimension, group[dimension], *(_csv(group[k]) for k in keys)])


def _csv(value: Any) -> Any:
    if isinstance(value, list):
        return "+".join(value)
    return "" if value is None else value


def plot(ledger: Ledger, path: str, source_note: str) -> None:
    """Two panels: energy over time by model, and joules per output token by model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in ledger.requests if r.joules is not None]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    if rows:
        first, last = rows[0].created, rows[-1].created
        span = max((last - first).total_seconds(), 1.0)
        bucket = next(s for s in (1, 10, 60, 600, 3600, 21600, 86400, 604800)
                      if span / s <= 60)
        models = sorted({r.answered_by or "(none)" for r in rows})
        series: dict[str, dict[float, float]] = {m: defaultdict(float) for m in models}
        for r in rows:
            slot = (r.created - first).total_seconds() // bucket * bucket
            series[r.answered_by or "(none)"][slot] += r.joules or 0.0
        slots = sorted({s for m in series.values() for s in m})
        bottom = [0.0] * len(slots)
        for model in models:
            values = [series[model].get(s, 0.0) for s in slots]
            left.bar([s / bucket for s in slots], values, bottom=bottom, label=model, width=0.9)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        left.set_xlabel(f"time since {first:%Y-%m-%d %H:%M:%S} UTC ({bucket:g} s bins)")
        left.legend()
        per_model = breakdown(rows, "model", 0.0)
        names = [g["model"] for g in per_model]
        right.bar(names, [g["joules_per_token"] or 0.0 for g in per_model], color="tab:green")
    else:
        left.text(0.5, 0.5, "no metered requests in this window", ha="center")
    left.set_title("energy by model")
    left.set_ylabel("joules")
    right.set_title("joules per output token by model")
    right.set_ylabel("J / token")
    figure.suptitle(f"GreenRoute ledger ({source_note})")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


# -- the command ------------------------------------------------------------------------------

def _largest(config: GatewayConfig | None) -> tuple[str | None, str]:
    if config is None:
        return None, "no config"
    tier = config.tiers_by_energy()[-1]
    return tier.name, f"energy_hint {tier.energy_hint:g} in the config"


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config) if args.config or not args.db else None
        if args.db:
            url = args.db if "://" in args.db else store.database_url(path=args.db)
        else:
            assert config is not None
            url = store.database_url(config.ledger.path, config.ledger.url)
        energy = config.energy if config is not None else EnergyConfig()
        grid = args.grid_intensity if args.grid_intensity is not None \
            else energy.grid_gco2_per_kwh
        series = GridIntensity.constant(grid) if args.grid_intensity is not None \
            else GridIntensity.from_config(energy)
        dimensions = [d.strip() for d in args.by.split(",") if d.strip()]
        unknown = [d for d in dimensions if d not in DIMENSIONS]
        if unknown:
            raise ValueError(f"unknown --by {', '.join(unknown)}; use {', '.join(DIMENSIONS)}")
        start, end = window(args.since, args.start, args.end)
        engine = store.open_engine(url, read_only=True)
        ledger = read_ledger(engine, start, end)
        if args.grid_intensity is not None:  # re-price every row at the intensity given
            for row in ledger.requests:
                row.gco2 = None
        if args.labels:
            engine.dispose()
            return run_labels(args, ledger, grid=grid, start=start, end=end, database=url)
        largest, how = _largest(config)
        report = build_report(ledger, engine, grid=grid, dimensions=dimensions,
                              largest=largest, largest_how=how, start=start, end=end,
                              database=url, series=series)
        if args.plot:
            sources = "+".join(report["totals"]["energy_sources"]) or "no energy source"
            plot(ledger, args.plot, f"energy source: {sources}")
        engine.dispose()
    except (ConfigError, ValueError, store.LedgerError, SQLAlchemyError, OSError) as exc:
        print(f"greenroute report: {exc}", file=sys.stderr)
        return 2
    if args.format == "json":
        _write_json(report)
    elif args.format == "csv":
        buffer = io.StringIO()
        render_csv(report, buffer)
        sys.stdout.write(buffer.getvalue())
    else:
        render_table(report, sys.stdout)
    return 0


def run_labels(args: argparse.Namespace, ledger: Ledger, *, grid: float, start: datetime | None,
               end: datetime | None, database: str) -> int:
    """`--labels`: the tiers' cards instead of the report, in the same window and formats."""
    # Each request at the intensity stored with it (a row without one, or all rows when
    # --grid-intensity re-prices them, at `grid`)
    stored = {r.id: r.grid_gco2_per_kwh for r in ledger.requests
              if r.gco2 is not None and r.grid_gco2_per_kwh is not None}
    cards = labels.tier_labels(ledger.attempts, grid, stored)
    if args.outcomes:
        cards = labels.with_quality(cards, args.outcomes)
    span = f"from {_day(start) or 'the start'} to {_day(end) or 'now'} (UTC)"
    header = (f"{span}; grid: each request's own intensity, else {grid:g} gCO2/kWh" if stored
              else f"{span}; grid {grid:g} gCO2/kWh")
    if args.outcomes:
        header += f"; quality from {os.path.basename(args.outcomes)}"
    if args.plot:
        labels.plot_cards(cards, args.plot, f"{_short(database)}\n{header}")
    if args.format == "json":
        _write_json({"database": database,
                     "window": {"from": start.isoformat() if start else None,
                                "to": end.isoformat() if end else None},
                     "grid_gco2_per_kwh": grid, "outcomes": args.outcomes,
                     "rating_scale": labels.RATING_SCALE, "labels": cards,
                     "notes": labels.notes(cards)})
    elif args.format == "csv":
        csv.writer(sys.stdout).writerows(labels.csv_rows(cards))
    else:
        labels.render_cards(cards, f"[bold]GreenRoute energy labels[/bold]  {database}  "
                                   f"{header}",
                            sys.stdout)
    return 0


def _short(database: str, keep: int = 70) -> str:
    """A ledger's URL that fits under a card: its end, where the file name is."""
    return database if len(database) <= keep else "..." + database[-keep + 3:]


def _day(value: datetime | None) -> str | None:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else None


def _write_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")
