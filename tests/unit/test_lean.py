"""The running agent imports only the parts of pyroute2 it uses (its package
__init__ pulls in NDB with sqlite3, IPDB and more: megabytes of RSS)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json, sys
from offloader.lean import pyroute2_on_demand
installed = pyroute2_on_demand()
import offloader.agent, offloader.parts  # what `ebpf-offloader run` imports
lean = sorted(m for m in ("pyroute2.ndb", "pyroute2.ipdb", "sqlite3") if m in sys.modules)
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
