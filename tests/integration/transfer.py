"""A lab transfer running in a thread while the test watches the agent."""

from __future__ import annotations

import threading
from typing import Any

from offloader.lab import Topology


def background_transfer(topo: Topology, **kw: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Start ``topo.transfer(**kw)``; the thread and the dict that gets its
    result (or ``error``, for the test to report) once it has finished."""
    out: dict[str, Any] = {}

    def go() -> None:
        try:
            out.update(topo.transfer(**kw))
        except Exception as exc:  # noqa: BLE001 - reported by the test
            out["error"] = repr(exc)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, out
