"""`GET /metrics`: the gateway's energy and ledger counters in Prometheus' text format.

Per device group: joules measured, attributed to requests and idle (settled so far), and meter
read failures; for the ledger: rows written, waiting, dropped (a full buffer), write failures.
"""

from __future__ import annotations

from greenroute.backends.energy.prometheus import render
from greenroute.backends.energy.sampler import Fleet
from greenroute.gateway.ledger.writer import LedgerWriter


def render_metrics(fleet: Fleet, writer: LedgerWriter | None) -> str:
    devices = fleet.distinct()
    parts = []
    for name, help_text, attribute in (
            ("greenroute_energy_measured_joules_total", "Energy the meter counted", "measured_j"),
            ("greenroute_energy_attributed_joules_total", "Energy attributed to requests",
             "attributed_j"),
            ("greenroute_energy_idle_joules_total", "Energy with no request in flight",
             "idle_j")):
        parts.append(render(name, help_text, "counter",
                            [({"device": d.name, "source": d.source}, getattr(d, attribute))
                             for d in devices]))
    parts.append(render("greenroute_energy_meter_errors_total", "Failed meter reads", "counter",
                        [({"device": d.name, "source": d.source}, d.read_errors)
                         for d in devices]))
    if writer is not None:
        stats = writer.stats()
        parts.append(render("greenroute_ledger_rows_written_total", "Rows written", "counter",
                            [({}, stats["written"])]))
        parts.append(render("greenroute_ledger_rows_buffered", "Rows waiting to be written",
                            "gauge", [({}, stats["buffered"])]))
        parts.append(render("greenroute_ledger_rows_dropped_total",
                            "Rows refused because the buffer was full", "counter",
                            [({}, stats["dropped"])]))
        parts.append(render("greenroute_ledger_write_failures_total", "Failed batch writes",
                            "counter", [({}, stats["write_failures"])]))
    return "".join(parts)
