"""Host side of the second-kernel lane: one test per guest module, each boots Debian's
6.1 kernel under qemu (virtme-ng, no KVM) and runs that module inside (lane.py).

Without the 6.1 kernel / vng / qemu: skip with the setup command, except in CI
(CI=true), where a skip would hide a broken lane, so it fails.
"""

from __future__ import annotations

import os
import time

import pytest

from .lane import HERE, LaneUnavailable, run_module, unavailable_reason

pytestmark = pytest.mark.kernel_lane

GUEST_MODULES = ["guest_vlan.py", "guest_pppoe.py", "guest_bpf.py"]
TIMEOUT = float(os.environ.get("KERNEL_LANE_TIMEOUT", "240"))


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.fixture(scope="session")
def lane_ready():
    why = unavailable_reason()
    if why:
        msg = f"second-kernel lane unavailable: {why}"
        if _in_ci():
            pytest.fail(msg + " (CI=true: a skipped lane counts as a failure)", pytrace=False)
        pytest.skip(msg)


def test_guest_modules_listed():
    """Every guest_*.py in this directory has a lane test (so none is forgotten)."""
    found = sorted(p.name for p in HERE.glob("guest_*.py"))
    assert found == sorted(GUEST_MODULES), found


@pytest.mark.parametrize("module", GUEST_MODULES)
def test_guest_module(lane_ready, module):
    t0 = time.monotonic()
    try:
        res = run_module(HERE / module, timeout=TIMEOUT)
    except LaneUnavailable as e:  # raced with the fixture's check
        pytest.fail(str(e), pytrace=False)
    print(res.report())
    print(f"lane wall time for {module}: {time.monotonic() - t0:.1f}s")
    assert res.passed, "\n" + res.report()
