"""CPU seconds per test file, for seeing where the suite's time goes (docs/architecture.md).

    PYTHONPATH=bench .venv/bin/pytest -p suite_cpu      # then: python3 bench/suite_cpu.py

A pytest plugin: each test's wall time and CPU time (this process plus the children it has
reaped, so a subprocess counts when it is waited for) go to suite_cpu.json; run as a script it
prints the totals and the heaviest files.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

OUT = Path("suite_cpu.json")
_rows: list[tuple[str, float, float]] = []
_started: dict[str, tuple[float, float]] = {}


def _cpu_s() -> float:
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                          resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def pytest_runtest_protocol(item: Any, nextitem: Any) -> None:
    _started[item.nodeid] = (time.monotonic(), _cpu_s())


def pytest_runtest_logfinish(nodeid: str, location: Any) -> None:
    if nodeid in _started:
        wall, cpu = _started.pop(nodeid)
        _rows.append((nodeid, time.monotonic() - wall, _cpu_s() - cpu))


def pytest_sessionfinish(session: Any) -> None:
    OUT.write_text(json.dumps(_rows))


def main() -> None:
    rows = json.loads(OUT.read_text())
    wall: Counter[str] = Counter()
    cpu: Counter[str] = Counter()
    for nodeid, w, c in rows:
        wall[nodeid.split("::")[0]] += w
        cpu[nodeid.split("::")[0]] += c
    print(f"{len(rows)} tests: wall {sum(wall.values()):.1f} s, CPU {sum(cpu.values()):.1f} s")
    for name, seconds in cpu.most_common(int(sys.argv[1]) if len(sys.argv) > 1 else 15):
        print(f"{seconds:7.1f} s CPU {wall[name]:7.1f} s wall  {name}")


if __name__ == "__main__":
    main()
