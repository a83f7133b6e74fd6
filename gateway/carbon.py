"""Grid carbon intensity over time, and the carbon-aware quality target of model `green`.

A grid's gCO2 per kWh varies several-fold within a day, so one constant misprices every row
that was not served at the average hour. `[energy] grid_intensity` names a file of hourly (or
any) readings; each ledger row stores the intensity at its time and its gCO2, and `report`
sums those. Without a file the constant `grid_gco2_per_kwh` is the whole series.

Files read (docs/energy.md, "Carbon over time"):
- CSV: Electricity Maps' export (`Datetime (UTC)`, `Carbon intensity gCO₂eq/kWh (direct)`;
  the direct, operational figure is taken over the life-cycle one when both are there), Ember's
  long format (`Date`, `Unit` = gCO2/kWh, `Value`), or any file with a time column
  (`timestamp`, `datetime`, `time`, `date`) and a `gco2_per_kwh` / `carbon_intensity` /
  `value` column.
- JSON: a plain list of `{"timestamp": ..., "gco2_per_kwh": ...}` objects (or `[time, value]`
  pairs); Electricity Maps' API answer (`{"history": [...]}` or `{"data": [...]}` with
  `datetime` and `carbonIntensity`); WattTime's (`{"data": [{"point_time", "value"}], "meta":
  {"units": "lbs_co2_per_mwh"}}`, converted to g/kWh).

A reading holds from its timestamp until the next one (hourly data: the hour's value); before
the first reading the first one holds, after the last the last one does.
"""

from __future__ import annotations

import bisect
import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from greenroute.gateway.config import ConfigError, EnergyConfig, RouterConfig

G_PER_KWH_PER_LB_PER_MWH = 0.45359237  # 1 lb/MWh = 453.59237 g per 1,000 kWh
J_PER_KWH = 3.6e6
_TIME_KEYS = ("datetime (utc)", "datetime", "timestamp", "time", "point_time", "date")
_VALUE_KEYS = ("gco2_per_kwh", "carbonintensity", "carbon_intensity", "intensity", "value")
_UNIT_KEYS = ("unit", "units")


class CarbonError(ConfigError):
    """A grid-intensity file that cannot be read as a series."""


class GridIntensity:
    """gCO2 per kWh as a step function of time (one constant when there is no file)."""

    def __init__(self, points: Iterable[tuple[float, float]], source: str) -> None:
        by_time = dict(sorted(points))  # a repeated timestamp: the later line wins
        if not by_time:
            raise CarbonError(f"{source}: no grid-intensity readings")
        self.times = list(by_time)
        self.values = list(by_time.values())
        self.source = source

    @classmethod
    def constant(cls, gco2_per_kwh: float) -> GridIntensity:
        return cls([(0.0, gco2_per_kwh)], f"{gco2_per_kwh:g} gCO2/kWh")

    @classmethod
    def from_config(cls, energy: EnergyConfig) -> GridIntensity:
        """The configured file's series, else the configured constant."""
        if energy.grid_intensity is None:
            return cls.constant(energy.grid_gco2_per_kwh)
        return load(energy.grid_intensity)

    def at(self, when: datetime) -> float:
        """The intensity in force at `when` (a time without a zone is taken as UTC)."""
        t = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
        index = bisect.bisect_right(self.times, t) - 1
        return self.values[max(index, 0)]

    def gco2(self, joules: float, when: datetime) -> float:
        return joules / J_PER_KWH * self.at(when)


class CarbonAwareTarget:
    """`[router] carbon_aware`: while the grid is above a threshold, model `green`'s default
    quality target is relaxed (never a target the request named itself)."""

    def __init__(self, above_gco2_per_kwh: float, relaxed_target: float,
                 grid: GridIntensity) -> None:
        self.above = above_gco2_per_kwh
        self.relaxed_target = relaxed_target
        self.grid = grid

    @classmethod
    def from_config(cls, router: RouterConfig, grid: GridIntensity) -> CarbonAwareTarget | None:
        rule = router.carbon_aware
        if rule is None:
            return None
        return cls(rule.above_gco2_per_kwh, rule.default_target, grid)

    def relax(self, target: float, when: datetime | None = None) -> tuple[float, str] | None:
        """(the relaxed target, the rule's name for headers and the ledger) when the grid is
        above the threshold now and the rule lowers `target`; None otherwise."""
        intensity = self.grid.at(when or datetime.now(UTC))
        if intensity <= self.above or self.relaxed_target >= target:
            return None
        return self.relaxed_target, (f"carbon:{target:g}->{self.relaxed_target:g}"
                                     f"@{intensity:.0f}g")


# -- reading files ----------------------------------------------------------------------------

def load(path: str | Path) -> GridIntensity:
    """The series in a CSV or JSON file (by its suffix; otherwise by its first character)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise CarbonError(f"grid intensity file {path}: {exc.strerror or exc}") from None
    is_json = path.suffix.lower() == ".json" or text.lstrip()[:1] in ("[", "{")
    points = _json_points(text, path) if is_json else _csv_points(text, path)
    return GridIntensity(points, str(path))


def parse_time(value: Any) -> float:
    """Unix seconds from an ISO 8601 time (UTC when it has no zone) or a number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"not a time: {value!r}")
    text = value.strip().replace("Z", "+00:00")
    moment = datetime.fromisoformat(text)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"not a number: {value!r}")
    number = float(value)
    if not number >= 0:  # also refuses NaN
        raise ValueError(f"not a non-negative intensity: {value!r}")
    return number


def _pick(columns: Sequence[str], wanted: Sequence[str]) -> str | None:
    lowered = {c.strip().lower(): c for c in columns}
    return next((lowered[w] for w in wanted if w in lowered), None)


def _value_column(columns: Sequence[str]) -> str | None:
    """Electricity Maps' direct intensity, else its only one, else a plain value column."""
    intensity = [c for c in columns if "carbon intensity" in c.lower()]
    direct = [c for c in intensity if "direct" in c.lower()]
    if direct or intensity:
        return (direct or intensity)[0]
    return _pick(columns, _VALUE_KEYS)


def _csv_points(text: str, path: Path) -> list[tuple[float, float]]:
    reader = csv.DictReader(io.StringIO(text))
    columns = reader.fieldnames or []
    time_column, value_column = _pick(columns, _TIME_KEYS), _value_column(columns)
    if time_column is None or value_column is None:
        raise CarbonError(f"{path}: needs a time column ({', '.join(_TIME_KEYS)}) and an "
                          f"intensity column (gCO2/kWh); found {', '.join(columns) or 'none'}")
    unit_column = _pick(columns, _UNIT_KEYS)
    points = []
    for line, row in enumerate(reader, start=2):
        if unit_column is not None and not _is_g_per_kwh(row.get(unit_column) or ""):
            continue  # Ember's long format: other variables in other units
        if not (row.get(value_column) or "").strip():
            continue  # a gap in the export
        try:
            points.append((parse_time(row[time_column]), _number(row[value_column])))
        except (ValueError, TypeError) as exc:
            raise CarbonError(f"{path}:{line}: {exc}") from None
    return points


def _is_g_per_kwh(unit: str) -> bool:
    compact = unit.lower().replace(" ", "").replace("₂", "2")
    return compact.startswith("gco2") and compact.endswith(("/kwh", "perkwh"))


def _json_points(text: str, path: Path) -> list[tuple[float, float]]:
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise CarbonError(f"{path}: invalid JSON: {exc}") from None
    scale = 1.0
    if isinstance(data, Mapping):
        units = str((data.get("meta") or {}).get("units", "")).lower()
        if "lbs" in units and "mwh" in units:
            scale = G_PER_KWH_PER_LB_PER_MWH  # WattTime's MOER
        elif units and not _is_g_per_kwh(units.replace("_per_", "/").replace("_", "")):
            raise CarbonError(f"{path}: units {units!r}: give gCO2/kWh or lbs_co2_per_mwh")
        data = data.get("history", data.get("data"))
    if not isinstance(data, list):
        raise CarbonError(f"{path}: expected a list of readings (or Electricity Maps' "
                          "history/data, or WattTime's data)")
    points = []
    for index, item in enumerate(data):
        try:
            if isinstance(item, Mapping):
                time_key, value_key = _pick(list(item), _TIME_KEYS), _pick(list(item),
                                                                           _VALUE_KEYS)
                if time_key is None or value_key is None:
                    raise ValueError(f"needs a time and an intensity, has {sorted(item)}")
                if item[value_key] is None:
                    continue  # a gap
                points.append((parse_time(item[time_key]), _number(item[value_key]) * scale))
            elif isinstance(item, list) and len(item) == 2:
                points.append((parse_time(item[0]), _number(item[1]) * scale))
            else:
                raise ValueError("expected an object or a [time, value] pair")
        except (ValueError, TypeError) as exc:
            raise CarbonError(f"{path}: reading {index}: {exc}") from None
    return points
