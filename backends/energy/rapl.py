"""CPU package energy from Linux RAPL (`/sys/class/powercap/intel-rapl:N/energy_uj`).

Each top-level zone (one per CPU package; AMD's `amd-rapl` too) is a microjoule counter that
wraps to zero at `max_energy_range_uj`. The meter keeps its own running total per zone and
adds `max - last + new` when a read is lower than the previous one, so it must be read at
least once per wrap period (minutes at full power; the sampler reads every ~100 ms).
Subzones (`intel-rapl:0:0`, core and uncore) are parts of their package and are not added
again. Since Linux 5.10 `energy_uj` is readable by root only: the error says so.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

from greenroute.backends.energy.meter import EnergySource, MeterError

POWERCAP = Path("/sys/class/powercap")
_PACKAGE_ZONE = re.compile(r"^(intel|amd)-rapl:\d+$")


@dataclass
class _Zone:
    path: Path
    max_uj: int
    last_uj: int
    total_uj: int = 0


def package_zones(root: Path = POWERCAP) -> list[Path]:
    """The top-level RAPL zones under `root` (one per CPU package)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _PACKAGE_ZONE.match(p.name))


class RaplMeter:
    """Cumulative joules of the CPU packages, from the RAPL counters."""

    source: EnergySource = "rapl"
    cheap = True  # one small sysfs read per package

    def __init__(self, root: Path | str = POWERCAP) -> None:
        zones = package_zones(Path(root))
        if not zones:
            raise MeterError(f"no RAPL package zones under {root}")
        self._lock = threading.Lock()
        self._zones = [_Zone(path, _read_uj(path / "max_energy_range_uj"),
                             _read_uj(path / "energy_uj")) for path in zones]
        self.device = "cpu:" + ",".join(z.path.name for z in self._zones)

    def read_joules(self) -> float:
        with self._lock:
            for zone in self._zones:
                now = _read_uj(zone.path / "energy_uj")
                if now >= zone.last_uj:
                    zone.total_uj += now - zone.last_uj
                else:  # wrapped past max_energy_range_uj
                    zone.total_uj += zone.max_uj - zone.last_uj + now
                zone.last_uj = now
            return sum(zone.total_uj for zone in self._zones) / 1e6


def _read_uj(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except PermissionError:
        raise MeterError(f"{path}: permission denied (RAPL counters are root-only since Linux "
                         "5.10; run as root, or grant read access to energy_uj)") from None
    except (OSError, ValueError) as exc:
        raise MeterError(f"{path}: {exc}") from None
