"""How a backend reports a request's token progress to the energy attributor, without the
Backend interface knowing about energy.

The gateway sets `current_track` around each backend call. A backend that can see tokens as
they are processed (the embedded llama.cpp one, in its per-token hook) sets
`reports_progress = True`, reads the track when a request arrives and calls `begin()` when its
worker starts on it, `tokens()` as it goes and `end()` when done. For every other backend the
gateway does it from the outside, from the usage in the answer.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Protocol


class Progress(Protocol):
    def begin(self) -> None: ...

    def tokens(self, n: float, at: float | None = None, prompt: float = 0.0) -> None: ...

    def end(self, at: float | None = None) -> None: ...


current_track: ContextVar[Progress | None] = ContextVar("greenroute_track", default=None)
