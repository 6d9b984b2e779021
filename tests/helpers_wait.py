"""One way for a test to wait for something that happens in another thread or process."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(
    predicate: Callable[[], T], timeout: float, what: str, every: float = 0.05, detail: Callable[[], str] | None = None
) -> T:
    """Ask `predicate` every `every` seconds until it answers something true, and return that answer.

    After `timeout` seconds the test fails, naming `what` (and `detail()`, e.g. a log's tail). The
    predicate is asked once more at the deadline, so a slow machine gets the whole timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        answer = predicate()
        if answer:
            return answer
        if time.monotonic() >= deadline:
            extra = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(every)
