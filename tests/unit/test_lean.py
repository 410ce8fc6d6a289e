"""The running agent imports only the parts of pyroute2 it uses (its package
__init__ pulls in NDB with sqlite3, IPDB and more: megabytes of RSS), and
its heap calls are glibc's or nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from offloader.lean import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, MALLOC_THRESHOLD, Heap, settle

PROBE = """
import json, sys
from offloader.lean import pyroute2_on_demand
installed = pyroute2_on_demand()
import offloader.agent, offloader.parts, offloader.cli  # what `ebpf-offloader run` imports
lean = sorted(m for m in ("pyroute2.ndb", "pyroute2.ipdb", "sqlite3", "logging.handlers")
              if m in sys.modules)
from pyroute2 import NDB  # code that wants the whole library still gets it
from pyroute2.iproute import IPRoute
import pyroute2
print(json.dumps({"installed": installed, "loaded": lean, "ndb": NDB.__module__,
                  "same": pyroute2.IPRoute is IPRoute}))
"""


def test_the_agent_runs_without_pyroute2s_package_init() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env=env, timeout=60, check=True).stdout
    got = json.loads(out)
    assert got["installed"] is True
    assert got["loaded"] == []  # an agent module importing from the package itself loads them
    assert got["ndb"] == "pyroute2.ndb.main" and got["same"] is True


class _Libc:
    """A C library that records the heap calls made to it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def mallopt(self, *args: int) -> int:
        self.calls.append(("mallopt", args))
        return 1

    def malloc_trim(self, *args: int) -> int:
        self.calls.append(("malloc_trim", args))
        return 1


def test_heap_calls_glibc_to_fix_its_thresholds_and_trim() -> None:
    libc = _Libc()
    heap = Heap(libc)
    heap.fix_thresholds()
    heap.trim()
    assert heap.glibc
    assert libc.calls == [("mallopt", (M_MMAP_THRESHOLD, MALLOC_THRESHOLD)),
                          ("mallopt", (M_TRIM_THRESHOLD, MALLOC_THRESHOLD)),
                          ("malloc_trim", (0,))]


def test_heap_without_glibc_does_nothing(monkeypatch: Any) -> None:
    """musl (OpenWrt) has neither mallopt's glibc options nor malloc_trim:
    faked here by a C library without ``gnu_get_libc_version``."""
    import ctypes

    class Musl:
        def __getattr__(self, name: str) -> Any:
            if name in ("gnu_get_libc_version", "malloc_trim"):
                raise AttributeError(name)
            return lambda *a: 0

    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: Musl())
    heap = Heap()
    assert not heap.glibc
    heap.fix_thresholds()  # no error, nothing called
    heap.trim()


def test_this_machines_glibc_is_found_and_trim_runs() -> None:
    heap = Heap()
    assert heap.glibc  # Debian: glibc
    heap.trim()


def test_settle_trims_now_and_on_a_timer() -> None:
    import gc

    libc, timers = _Libc(), []
    threshold = gc.get_threshold()
    try:
        settle(lambda interval, fire: timers.append((interval(), fire)), Heap(libc))
        assert gc.get_threshold()[0] == 20_000
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
    assert libc.calls == [("malloc_trim", (0,))]
    [(interval, fire)] = timers
    assert interval > 0
    fire()
    assert libc.calls == [("malloc_trim", (0,))] * 2
