"""The server's shutdown as the requests in flight see it.

On SIGTERM the server stops accepting connections and waits up to its grace
(`[server] shutdown_grace_s`) for the requests in flight. When the grace ends, `ended`
completes: every model call still waiting is cancelled, and its client gets an OpenAI-shaped
503 (a whole answer) or a final error event (a stream), and its ledger row says
`server_shutting_down`, instead of the connection being cut (gateway/streaming.py).
"""

from __future__ import annotations

import asyncio


class Drain:
    """The end of the shutdown grace, as a future the requests wait on beside their work."""

    def __init__(self) -> None:
        self._ended: asyncio.Future[None] | None = None

    @property
    def ended(self) -> asyncio.Future[None]:
        """Completes when the grace is over. Made in the running loop on first use, and again
        if the app is served by another loop later (as a TestClient without a lifespan does)."""
        loop = asyncio.get_running_loop()
        if self._ended is None or self._ended.get_loop() is not loop:
            done = self._ended is not None and self._ended.done()
            self._ended = loop.create_future()
            if done:
                self._ended.set_result(None)
        return self._ended

    def begin(self, grace_s: float) -> None:
        """The shutdown has begun: the grace ends in `grace_s` seconds."""
        asyncio.get_running_loop().call_later(grace_s, self.end)

    def end(self) -> None:
        """End the grace now: what is still running is ended with an error."""
        if not self.ended.done():
            self.ended.set_result(None)
