"""A remote GPU's energy counter, scraped from a Prometheus text endpoint.

For models served on another host (vLLM on a GPU box): NVIDIA's DCGM exporter publishes
`DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION` (millijoules since boot, one series per GPU, label
`gpu`), and `greenroute agent` publishes the same series from NVML. The meter sums the series
of the configured GPUs; a series that goes down (the exporter or the GPU restarted) restarts
from zero rather than subtracting. A scrape is an HTTP round trip, so the meter is not `cheap`:
only its sampler reads it, never a request.

The exposition format is parsed here (a few dozen lines) rather than with prometheus_client:
only samples with labels and a value are needed, and the agent writes the same format.
"""

from __future__ import annotations

import math
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence

from greenroute.backends.energy.meter import EnergySource, MeterError

DCGM_ENERGY = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


class FormatError(ValueError):
    """A line of the exposition text that is not a valid sample."""


def parse_samples(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """(metric name, labels, value) for every sample line; comments and blanks skipped."""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _SAMPLE.match(line.strip())
        if match is None:
            raise FormatError(f"line {number}: not a sample: {line[:80]!r}")
        name, _, body, value, _ = match.groups()
        try:
            yield name, _labels(body or "", number), float(value)
        except ValueError:
            raise FormatError(f"line {number}: bad value {value!r}") from None


def _labels(body: str, number: int) -> dict[str, str]:
    labels: dict[str, str] = {}
    position = 0
    while position < len(body):
        match = _LABEL.match(body, position)
        if match is None:
            if body[position:].strip(" ,"):
                raise FormatError(f"line {number}: bad labels {body!r}")
            break
        value = re.sub(r'\\[\\"n]', lambda m: _UNESCAPE[m.group(0)], match.group(2))
        labels[match.group(1)] = value
        position = match.end()
    return labels


def render(name: str, help_text: str, kind: str,
           samples: Iterable[tuple[Mapping[str, str], float]]) -> str:
    """One metric family in the text exposition format."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        pairs = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        lines.append(f"{name}{{{pairs}}} {_number(value)}" if pairs else f"{name} {_number(value)}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def scrape(url: str, timeout_s: float) -> str:
    """The text of a Prometheus endpoint; any failure is a MeterError."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            body: bytes = response.read()
            return body.decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        raise MeterError(f"scraping {url}: {exc}") from exc


class PrometheusMeter:
    """Cumulative joules of some GPUs' counter series on a Prometheus text endpoint."""

    source: EnergySource = "prometheus"
    cheap = False

    def __init__(self, url: str, gpus: Sequence[int | str] = (), metric: str = DCGM_ENERGY,
                 joules_per_unit: float = 0.001, label: str = "gpu",
                 timeout_s: float = 2.0) -> None:
        self.url = url
        self.metric = metric
        self.joules_per_unit = joules_per_unit
        self.label = label
        self.gpus = {str(g) for g in gpus}
        self.timeout_s = timeout_s
        self.device = f"{url}#{label}=" + (",".join(sorted(self.gpus)) or "*")
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._total = 0.0  # units, summed over series, resets absorbed
        self.read_joules()  # fail at start-up, not at the first sample, if it cannot be read

    def _scrape(self) -> str:
        return scrape(self.url, self.timeout_s)

    def _series(self, text: str) -> dict[str, float]:
        try:
            found = {labels.get(self.label, ""): value
                     for name, labels, value in parse_samples(text) if name == self.metric
                     and (not self.gpus or labels.get(self.label) in self.gpus)}
        except FormatError as exc:
            raise MeterError(f"{self.url}: {exc}") from exc
        missing = self.gpus - found.keys()
        if not found or missing:
            which = ", ".join(sorted(missing)) or "any"
            raise MeterError(f"{self.url} has no {self.metric} series for {self.label} {which}")
        if any(math.isnan(v) or v < 0 for v in found.values()):
            raise MeterError(f"{self.url}: {self.metric} has a negative or NaN value")
        return found

    def read_joules(self) -> float:
        series = self._series(self._scrape())
        with self._lock:
            for key, value in series.items():
                last = self._last.get(key)
                if last is not None:
                    self._total += value - last if value >= last else value  # a reset
                self._last[key] = value
            return self._total * self.joules_per_unit
