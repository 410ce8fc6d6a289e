"""Faults (docs/reliability.md): SIGKILL, SIGSTOP past the heartbeat timeout
and SIGCONT, and a restart with adoption, during one offloaded TCP transfer:
no connection lost, the fail-safe engaged during each outage (the pinned
pass_stale counter moved), and `status` told the truth each time."""

from __future__ import annotations

import json

import pytest

from offloader.lab import Topology

from .campaign import faults

pytestmark = pytest.mark.root


def test_kill_stop_and_restart_lose_no_connection(lab: Topology) -> None:
    out = faults(lab)
    print(json.dumps(out, indent=1))
    assert out["offloaded_first"], out
    # SIGKILL: status says there is no agent, in one sentence; the datapath
    # passed to the kernel meanwhile; the restart adopted the flow.
    assert out["kill_status"]["rc"] == 1, out
    assert out["kill_status"]["stderr"] == ("no ebpf-offloader agent is running in this "
                                            "network namespace."), out
    assert out["kill_fail_safe"] and out["kill_pass_stale"] > 0, out
    assert out["kill_adopted"] and out["kill_offloaded_after"] and out["kill_moving_after"], out
    # SIGSTOP: status times out with a clear message, not a traceback.
    stop = out["stop_status"]
    assert stop["rc"] == 1 and "Traceback" not in stop["stderr"], out
    assert "did not answer" in stop["stderr"] and "stopped or stuck" in stop["stderr"], out
    assert len(stop["stderr"].splitlines()) == 1, out
    assert out["stop_fail_safe"] and out["stop_pass_stale"] > 0, out
    assert out["stop_status_after"] and out["stop_offloaded_after"] and out["stop_moving_after"], out
    # A clean restart: adopted, offloaded at once, still forwarding.
    assert out["restart_adopted"] and out["restart_offloaded_at_once"], out
    assert out["restart_moving_after"], out
    # No connection lost: every byte arrived, in order.
    assert out["transfer"].get("intact"), out
