"""A model server's own token counters, the denominator for energy shared across processes.

Several gateway processes (replicas, workers) in front of one vLLM server all read the same GPU
counter; each one alone sees only its own requests. vLLM counts every token it processes, for
every client, in Prometheus counters on its `/metrics`: `vllm:prompt_tokens_total`,
`vllm:generation_tokens_total` (one series per `model_name`, summed here) and the gauge
`vllm:num_requests_running`. Read beside the energy counter, they let one process take
E x (its tokens / the server's tokens) of an interval and leave the rest to the server's other
clients. A scrape is an HTTP round trip: only the device's sampler reads it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from greenroute.backends.energy.meter import MeterError
from greenroute.backends.energy.prometheus import FormatError, parse_samples, scrape

VLLM_PROMPT = "vllm:prompt_tokens_total"
VLLM_GENERATED = "vllm:generation_tokens_total"
VLLM_RUNNING = "vllm:num_requests_running"


@dataclass(frozen=True, slots=True)
class ServerCount:
    """Cumulative tokens a server has processed (resets absorbed), and requests running now."""

    prompt: float
    generated: float
    running: float


def metrics_url(api_url: str) -> str:
    """vLLM's metrics endpoint for its OpenAI API URL: the URL without `/v1`, plus `/metrics`."""
    base = api_url.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    return base + "/metrics"


class ServerTokens:
    """vLLM's token counters on one server's `/metrics`."""

    def __init__(self, url: str, timeout_s: float = 2.0) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str], float] = {}
        self._totals = {VLLM_PROMPT: 0.0, VLLM_GENERATED: 0.0}

    def read(self) -> ServerCount:
        text = scrape(self.url, self.timeout_s)
        values: dict[tuple[str, str], float] = {}
        running = 0.0
        seen = set()
        try:
            for name, labels, value in parse_samples(text):
                if name in self._totals:
                    series = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
                    values[name, series] = value
                    seen.add(name)
                elif name == VLLM_RUNNING:
                    running += value
                    seen.add(name)
        except FormatError as exc:
            raise MeterError(f"{self.url}: {exc}") from exc
        if not {VLLM_PROMPT, VLLM_GENERATED} <= seen:
            raise MeterError(f"{self.url} has no {VLLM_PROMPT} and {VLLM_GENERATED} series")
        with self._lock:
            for key, value in values.items():
                last = self._last.get(key)
                if last is not None:
                    self._totals[key[0]] += value - last if value >= last else value  # restart
                self._last[key] = value
            return ServerCount(self._totals[VLLM_PROMPT], self._totals[VLLM_GENERATED], running)
