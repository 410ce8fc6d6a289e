"""Bounded polls of an observable condition, instead of fixed sleeps."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll(pred: Callable[[], T], timeout: float = 10.0, step: float = 0.1) -> T:
    """Call ``pred`` every ``step`` seconds until it returns something true or
    ``timeout`` seconds have passed; return its last value (false on timeout),
    so that ``assert poll(...)`` reads as the condition it waits for."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    return pred()
