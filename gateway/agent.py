"""`greenroute agent`: a tiny exporter that serves this host's NVML energy counters over HTTP in
the DCGM exporter's format, for a gateway on another host to read with a `prometheus` meter.

    GET /metrics  ->  DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="0",UUID="GPU-...",...} <mJ>

Same series name, unit (millijoules) and `gpu` label as DCGM's, so a gateway reads either one
with the same config. It is the standard library's threaded HTTP server: no framework for one
read-only endpoint. GPUs without an energy counter are integrated from power readings by a
background thread every `--interval-ms`.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from greenroute.backends.energy.meter import MeterError
from greenroute.backends.energy.nvml import NvmlMeter, load_nvml
from greenroute.backends.energy.prometheus import CONTENT_TYPE, DCGM_ENERGY, render

log = logging.getLogger("greenroute.agent")


def add_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = commands.add_parser(
        "agent", help="serve this host's GPU energy counters for a remote gateway",
        description="Serve NVML's cumulative energy counters of this host's GPUs at /metrics, "
                    f"in the DCGM exporter's format ({DCGM_ENERGY}, millijoules, label gpu). "
                    "Point a tier's meter at it: [tiers.meter] kind = \"prometheus\", "
                    "url = \"http://HOST:PORT/metrics\".")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=int, default=9400, help="port (DCGM exporter's: 9400)")
    parser.add_argument("--gpus", help="NVML indices, comma-separated (default: all)")
    parser.add_argument("--interval-ms", type=int, default=100,
                        help="power sampling for GPUs without an energy counter")
    parser.set_defaults(handler=run)


def metrics_text(meter: NvmlMeter) -> str:
    hostname = socket.gethostname()
    return render(DCGM_ENERGY, "Total energy consumption since boot (in mJ).", "counter",
                  [({"gpu": str(index), "UUID": uuid, "modelName": name, "Hostname": hostname},
                    round(mj)) for index, uuid, name, mj in meter.per_gpu_millijoules()])


class AgentServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], meter: NvmlMeter) -> None:
        super().__init__(address, _Handler)
        self.meter = meter


class _Handler(BaseHTTPRequestHandler):
    server: AgentServer

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        if self.path.split("?", 1)[0] != "/metrics":
            self._send(404, b"not found: GET /metrics\n")
            return
        try:
            body = metrics_text(self.server.meter).encode()
        except MeterError as exc:
            self._send(503, f"{exc}\n".encode())
            return
        self._send(200, body, CONTENT_TYPE)

    def _send(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)


def serve(meter: NvmlMeter, host: str, port: int, interval_s: float,
          stop: threading.Event) -> AgentServer:
    """Start serving on a thread (and integrating power, if any GPU needs it); return the
    server, which runs until `stop` is set."""
    server = AgentServer((host, port), meter)
    threading.Thread(target=server.serve_forever, name="agent-http", daemon=True).start()

    def integrate() -> None:
        while not stop.wait(interval_s):
            try:
                meter.read_joules()
            except MeterError as exc:
                log.warning("%s", exc)

    if meter.integrating:
        threading.Thread(target=integrate, name="agent-power", daemon=True).start()

    def shutdown() -> None:
        stop.wait()
        server.shutdown()
        server.server_close()

    threading.Thread(target=shutdown, name="agent-stop", daemon=True).start()
    return server


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        nvml = load_nvml()
        if args.gpus:
            gpus = [int(g) for g in args.gpus.split(",")]
        else:
            nvml.nvmlInit()
            gpus = list(range(nvml.nvmlDeviceGetCount()))
        meter = NvmlMeter(gpus, nvml)
    except (MeterError, ValueError) as exc:
        print(f"greenroute agent: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # an NVML error from the device count
        print(f"greenroute agent: NVML: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    server = serve(meter, args.host, args.port, args.interval_ms / 1000, stop)
    log.info("serving %s of GPUs %s on http://%s:%d/metrics (integrating power: %s)",
             DCGM_ENERGY, gpus, args.host, server.server_address[1], meter.integrating or "none")
    try:
        stop.wait()
    except KeyboardInterrupt:
        stop.set()
    return 0
