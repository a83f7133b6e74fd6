"""Python's garbage collector, set for a long-running server once it has started.

With CPython's default threshold (a collection of the youngest generation every 700 net
allocations of tracked objects), the objects of the requests in flight keep crossing it: under
64 concurrent pass-through requests the collector ran every 10 requests or so, promoted the
in-flight objects it found alive, and then scanned them again in the older generations. That
cost 133 us of the gateway's 1,323 us of CPU per request (bench/gc_threshold.py, startup
already frozen), and the requests leave almost
no garbage behind (the net count hardly moves between them), so the scans found nothing to
free. Two changes, both stated in docs/gateway.md with their measurements:

- a higher threshold for the youngest generation (`[server] gc_threshold`, 10,000 by default),
  which the short-lived request objects never reach: they are freed by reference counting
  before a collection would look at them;
- `gc.freeze()` once startup is done, so that the tens of thousands of objects the app built
  (modules, config, router, models) are never scanned again by a full collection.

Garbage in cycles is still collected: each cycle left behind counts towards the threshold.
"""

from __future__ import annotations

import gc


def tune_for_serving(threshold: int) -> None:
    """Freeze what startup built, and collect the youngest generation every `threshold` net
    allocations; the older generations keep their ratios."""
    gc.collect()  # what startup left as garbage is freed, not frozen
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(threshold, older, oldest)
