"""`collect --pause-file`: while the file exists, no new prompt is started (a long collection
yields the machine's cores to a benchmark or a test run without losing its place)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

POLL_S = 1.0


async def wait_while_paused(pause: Path | None, note: Callable[[str], None],
                            poll_s: float = POLL_S) -> None:
    """Return at once without a pause file; else once it is gone, noting both moments."""
    if pause is None or not pause.exists():
        return
    note(f"paused while {pause} exists")
    while pause.exists():
        await asyncio.sleep(poll_s)
    note("resumed")
