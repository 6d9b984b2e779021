"""The edge's two clocks: its wall clock (for people) and its quiet clock (for completion).

A study is complete when no instance of it arrived for `stable_age` seconds
*by the edge's own reckoning*. The flows that upload completed studies may run
on another machine whose clock differs from the edge's by seconds or hours, so
they never compare the edge's timestamps with their own clock. Instead the
running edge keeps a **quiet clock** in its journal: the seconds it has been
running, summed over all its runs (`time.monotonic()` while it runs, resumed
from the journal at each start), written as a heartbeat every few seconds.
Each study records the quiet-clock reading of its last instance, and a study
is complete when `last_clock <= edge_clock - stable_age`, both readings of the
edge's quiet clock. Steps of the edge's wall clock (an NTP correction) change
neither: the quiet clock is monotonic.

While the edge is stopped its quiet clock stands still at its last heartbeat:
its studies are judged as of that moment, and a study whose last instance
arrived shortly before the stop waits for the edge's next run (nothing can be
added to it meanwhile, and its sender may still be waiting to resend the rest).

`RENKEI_EDGE_CLOCK_OFFSET` (seconds, may be negative) shifts the edge's wall
clock. Only the tests set it, to run a real edge whose clock is behind or ahead
of the machine's; it never changes the quiet clock.
"""

from __future__ import annotations

import os
import time

CLOCK_OFFSET_ENV = "RENKEI_EDGE_CLOCK_OFFSET"


def _offset() -> float:
    raw = os.environ.get(CLOCK_OFFSET_ENV, "").strip()
    if not raw:
        return 0.0
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{CLOCK_OFFSET_ENV}={raw!r} is not a number of seconds") from None


_OFFSET = _offset()


def wall_time() -> float:
    """The edge's wall clock: seconds since the epoch (shifted by RENKEI_EDGE_CLOCK_OFFSET in tests)."""
    return time.time() + _OFFSET


class QuietClock:
    """Seconds the edge has run, over all its runs: `base` (from the journal) plus this run's monotonic time."""

    def __init__(self, base: float = 0.0) -> None:
        self.base = float(base)
        self._started = time.monotonic()

    def now(self) -> float:
        return self.base + (time.monotonic() - self._started)


def heartbeat_interval(stable_age: float) -> float:
    """How often the running edge writes its quiet clock: a quarter of stable_age, 0.25 s to 2 s.

    A reader's view of the clock lags by at most this, which only ever delays a completion.
    """
    return min(2.0, max(0.25, stable_age / 4))
