"""Polling instead of sleeping, for every harness (Bitcoin Core's test framework style)."""

from __future__ import annotations

import time
from collections.abc import Callable


class WaitTimeout(AssertionError, TimeoutError):
    """``wait_until`` gave up. An AssertionError so pytest shows it as a test failure,
    a TimeoutError for code that handles time-outs generically."""


def wait_until(
    predicate: Callable[[], object],
    timeout: float = 30.0,
    interval: float | Callable[[], None] = 0.05,
    message: str | Callable[[], str] = "condition",
) -> None:
    """Poll ``predicate`` until it returns truthy; raise ``WaitTimeout`` after ``timeout``.

    ``interval`` is seconds between polls, or a callable that waits on something useful
    (a child process, say, so a crash is noticed at once) and may raise. ``message`` may
    be a callable so the error shows the state at the time of failure.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise WaitTimeout(f"timed out after {timeout}s waiting for: {text}")
        if callable(interval):
            interval()
        else:
            time.sleep(interval)
