"""Waiting for a state with a deadline, instead of sleeping and hoping it has come."""

import time


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate()`` until it returns something truthy, and return that; raise an
    AssertionError naming ``what`` (and the last value seen) if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last seen: {value!r})")
        time.sleep(interval)
