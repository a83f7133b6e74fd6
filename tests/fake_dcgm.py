"""A fake DCGM exporter on loopback: one GPU's energy counter, integrated from a power curve.

`power()` (watts, any callable: e.g. a base draw plus some per running request of a fake vLLM)
is integrated every millisecond or so on a thread; `/metrics` serves the total in millijoules as
`DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="0",...}`, the exporter's name, unit and labels,
`delay_s` after reading it (a real exporter on a busy node takes tens of milliseconds).
`TextEndpoint` is the HTTP part alone, for tests that write the exposition text themselves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from greenroute.backends.energy.prometheus import CONTENT_TYPE, DCGM_ENERGY, render


class TextEndpoint:
    """A loopback HTTP server answering every GET with `text()` as Prometheus text."""

    def __init__(self, text: Callable[[], str], delay_s: float = 0.0) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                body = text().encode()
                if delay_s:
                    time.sleep(delay_s)
                self.send_response(200)
                self.send_header("content-type", CONTENT_TYPE)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/metrics"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> TextEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop answering (again: a no-op); scrapes from then on fail to connect."""
        self._server.shutdown()
        self._server.server_close()


class FakeDcgm:
    def __init__(self, power: Callable[[], float], step_s: float = 0.001,
                 delay_s: float = 0.0) -> None:
        self.power = power
        self.step_s = step_s
        self.joules = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._endpoint = TextEndpoint(self._text, delay_s)
        self.url = self._endpoint.url
        self._integrator = threading.Thread(target=self._integrate, daemon=True)

    def _text(self) -> str:
        with self._lock:
            millijoules = round(self.joules * 1000)
        return render(DCGM_ENERGY, "Total energy consumption since boot (in mJ).", "counter",
                      [({"gpu": "0", "UUID": "GPU-fake", "Hostname": "h"}, millijoules)])

    def _integrate(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.step_s):
            now = time.monotonic()
            watts = self.power()
            with self._lock:
                self.joules += watts * (now - last)
            last = now

    def __enter__(self) -> FakeDcgm:
        self._integrator.start()
        self._endpoint.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._endpoint.__exit__()
