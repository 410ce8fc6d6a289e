"""Keeping the running agent small: what it imports, and its heap.

``import pyroute2.netlink`` runs ``pyroute2/__init__.py`` first, and that
imports every API the library has (NDB with sqlite3, IPDB, the plan9 and
CLI servers, ssl, ...): 9 MB of the agent's RSS on pyroute2 0.7.9 and 6 MB
on 0.9.7, while the agent uses the netlink codecs, ``IPRoute`` and ethtool.
``pyroute2_on_demand`` puts a stand-in for the package in ``sys.modules``
before anything of pyroute2 is imported: submodules import as usual (the
stand-in has the package's ``__path__``), and the real ``__init__`` runs
into the stand-in the first time a name only it defines is asked for
(``from pyroute2 import NDB``), so code that wants the whole library still
gets it. Modules of the agent import from submodules
(``from pyroute2.iproute import IPRoute``), never from the package.

``settle`` runs once start-up is done: what it built is frozen out of the
collector's scans, and ``Heap`` gives glibc's freed pages back (a no-op on
musl); see docs/performance.md, "Memory".
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import sys
import types
from collections.abc import Callable
from typing import Any

PACKAGE = "pyroute2"


class _OnDemand(types.ModuleType):
    """The package without its ``__init__`` until a name of it is needed."""

    _loading = False

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__") and name not in ("__all__", "__version__"):
            raise AttributeError(name)  # what the import system probes
        # A submodule (``from pyroute2 import config``) imports on its own.
        if importlib.util.find_spec(f"{PACKAGE}.{name}") is not None:
            return importlib.import_module(f"{PACKAGE}.{name}")
        if not _OnDemand._loading:
            _OnDemand._loading = True
            spec = self.__spec__
            assert spec is not None and spec.loader is not None
            spec.loader.exec_module(self)  # the real __init__, into this module
            if name in self.__dict__:
                return self.__dict__[name]
        raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}")


def pyroute2_on_demand() -> bool:
    """Install the stand-in; False when pyroute2 is imported already or
    not installed (then nothing changes)."""
    if PACKAGE in sys.modules:
        return False
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.submodule_search_locations is None:
        return False
    module = _OnDemand(PACKAGE)
    module.__spec__ = spec
    module.__loader__ = spec.loader
    module.__file__ = spec.origin
    module.__path__ = list(spec.submodule_search_locations)
    module.__package__ = PACKAGE
    sys.modules[PACKAGE] = module
    return True


# -- the heap --------------------------------------------------------------------------------
# glibc's malloc keeps what Python frees in its heap: the top is given back
# only past a trim threshold, and the mmap threshold rises to the size of
# each large block freed, so that later large buffers (a sweep's batches, a
# dump's lists) come from the heap and leave holes in it. Neither exists in
# musl (OpenWrt's C library), whose allocator unmaps freed memory itself.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MALLOC_THRESHOLD = 128 * 1024  # glibc's default for both, here kept fixed


class Heap:
    """glibc's malloc tuning and ``malloc_trim``; every call is a no-op
    where the C library is not glibc (musl: no such functions)."""

    def __init__(self, libc: Any = None) -> None:
        self._libc = libc if libc is not None else _glibc()

    @property
    def glibc(self) -> bool:
        return self._libc is not None

    def fix_thresholds(self) -> None:
        """Keep large blocks mmapped and the heap's top trimmed at 128 KiB:
        setting a threshold turns off glibc's moving of both."""
        if self._libc is not None:
            self._libc.mallopt(M_MMAP_THRESHOLD, MALLOC_THRESHOLD)
            self._libc.mallopt(M_TRIM_THRESHOLD, MALLOC_THRESHOLD)

    def trim(self) -> None:
        """Give the free pages of the heap back to the kernel (tens of us)."""
        if self._libc is not None:
            self._libc.malloc_trim(0)


def _glibc() -> Any:
    """The process's C library when it is glibc, else None."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it)
        trim, mallopt = libc.malloc_trim, libc.mallopt
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return libc


# Allocations between young-generation collections (CPython's default 700):
# a new flow allocates some tens of objects, nearly all freed at once, and a
# burst of new flows ran a collection every few flows (3% of the agent's
# CPU at 5,000 new flows a second, gc.callbacks).
GC_YOUNG_THRESHOLD = 20_000
TRIM_EVERY_S = 10.0  # a sweep's or a burst's freed heap goes back within this


def settle(every: Callable[[Callable[[], float], Callable[[], None]], object],
           heap: Heap | None = None) -> Heap:
    """Once start-up is done: what it built lives as long as the agent and
    is never scanned again (a full collection over it took 66 ms in a burst
    of new flows); the heap it freed goes back now, and every
    ``TRIM_EVERY_S`` through ``every`` (the loop's timers)."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    heap = heap or Heap()
    heap.trim()
    every(lambda: TRIM_EVERY_S, heap.trim)
    return heap
