"""Importing only what the running agent uses.

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
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
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
