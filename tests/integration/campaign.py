"""The reliability campaign's scenarios (docs/reliability.md), shared by the
tests (short runs, asserted there) and ``python -m bench.reliability`` (the
long runs, whose figures the docs quote). Each scenario takes a lab
topology, runs its stimulus against an offloaded transfer and returns what
it saw as a dict; nothing here asserts except where a step cannot go on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from offloader.lab import Topology


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, step: float = 0.1) -> Any:
    """Poll ``pred`` until it is true or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    return pred()


def senders_plain(topo: Topology) -> None:
    """Packet counts mean packets: no TSO/GSO on the sending hosts."""
    for host in (topo.lan1, topo.lan2, topo.wan):
        host.sh("ethtool -K eth0 tso off gso off >/dev/null")


class Transfer:
    """A lab transfer in a thread; ``result`` once it has finished."""

    def __init__(self, topo: Topology, **kw: Any) -> None:
        self.result: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._go, args=(topo, kw), daemon=True)
        self._thread.start()

    def _go(self, topo: Topology, kw: dict[str, Any]) -> None:
        try:
            self.result.update(topo.transfer(**kw))
        except Exception as exc:  # noqa: BLE001 - reported in the result
            self.result["error"] = repr(exc)

    def join(self, timeout: float) -> dict[str, Any]:
        self._thread.join(timeout)
        return self.result


def flows_of(topo: Topology, proto: str, sport: int) -> list[dict[str, Any]]:
    """Both directions' flows of the connection from ``sport`` (the reply's
    destination port is the source port, or its NAT mapping)."""
    st = topo.status(check=False) or {"flows": []}
    return [f for f in st["flows"] if f["proto"] == proto and sport in (f["sport"], f["dport"])]


def offloaded(topo: Topology, proto: str, sport: int) -> list[dict[str, Any]]:
    return [f for f in flows_of(topo, proto, sport) if f["state"] == "offloaded"]


def packets_of(topo: Topology, proto: str, sport: int) -> int:
    return sum(f["packets"] for f in offloaded(topo, proto, sport))


def moving(topo: Topology, proto: str, sport: int, timeout: float = 10.0) -> bool:
    """The connection's offloaded counters move (the datapath forwards it)."""
    first = packets_of(topo, proto, sport)
    return bool(wait_for(lambda: packets_of(topo, proto, sport) > first, timeout=timeout))


def pin_dir(topo: Topology) -> str:
    ino = os.stat(f"/run/netns/{topo.router.name}").st_ino
    return f"/sys/fs/bpf/ebpf-offloader/netns-{ino}"


def pinned_stat(topo: Topology, name: str) -> int:
    """A datapath counter read from the pinned stats map (bpftool): readable
    while the agent is dead or stopped."""
    from offloader.layout import layout

    index = layout().const(f"OFL_STAT_{name.upper()}")
    key = " ".join(str(b) for b in index.to_bytes(4, "little"))
    out = subprocess.run(f"bpftool -j map lookup pinned {pin_dir(topo)}/ofl_stats key {key}",
                         shell=True, capture_output=True, text=True, timeout=10).stdout
    values = json.loads(out).get("values", [])
    return sum(int(v["value"]) if isinstance(v["value"], int)
               else int.from_bytes(bytes(int(b, 16) for b in v["value"]), "little")
               for v in values)


def cli_status(topo: Topology) -> subprocess.CompletedProcess[str]:
    """``ebpf-offloader status`` as a user types it (human output)."""
    return topo.cli("status", check=False)


# -- faults ---------------------------------------------------------------------------
def faults(topo: Topology, *, heartbeat: float = 1.0, size: int = 9_000_000,
           rate: int = 300_000, sport: int = 41100) -> dict[str, Any]:
    """SIGKILL and restart, SIGSTOP past the heartbeat timeout and SIGCONT,
    a clean restart: each during one offloaded TCP transfer. The agent runs
    under ``nsenter --net`` so that its maps are pinned (adoption)."""
    extra = ["-o", f"heartbeat_timeout={heartbeat}"]
    senders_plain(topo)
    topo.start_agent(hook="xdp", nsenter=True, extra=extra)
    out: dict[str, Any] = {"heartbeat_timeout_s": heartbeat}
    transfer = Transfer(topo, proto="tcp", family=4, size=size, rate_pps=rate,
                        timeout=120, sport=sport)
    try:
        out["offloaded_first"] = bool(wait_for(lambda: offloaded(topo, "tcp", sport)))

        # SIGKILL: no agent; the datapath's heartbeat goes stale and it passes.
        stale = pinned_stat(topo, "pass_stale")
        assert topo.agent is not None
        topo.stop_agent(sig=signal.SIGKILL)
        killed = cli_status(topo)
        out["kill_status"] = {"rc": killed.returncode, "stderr": killed.stderr.strip()}
        out["kill_fail_safe"] = bool(wait_for(lambda: pinned_stat(topo, "pass_stale") > stale,
                                              timeout=heartbeat + 10))
        out["kill_pass_stale"] = pinned_stat(topo, "pass_stale") - stale
        topo.start_agent(hook="xdp", nsenter=True, extra=extra)
        out["kill_adopted"] = "adopted" in topo.read_agent_log()
        out["kill_offloaded_after"] = bool(wait_for(lambda: offloaded(topo, "tcp", sport)))
        out["kill_moving_after"] = moving(topo, "tcp", sport)

        # SIGSTOP past the heartbeat timeout: status cannot be answered.
        assert topo.agent is not None
        stale = pinned_stat(topo, "pass_stale")
        topo.agent.send_signal(signal.SIGSTOP)
        try:
            stopped = cli_status(topo)  # waits for the client's timeout (10 s)
            out["stop_status"] = {"rc": stopped.returncode, "stderr": stopped.stderr.strip()}
            out["stop_fail_safe"] = bool(wait_for(
                lambda: pinned_stat(topo, "pass_stale") > stale, timeout=heartbeat + 10))
        finally:
            topo.agent.send_signal(signal.SIGCONT)
        out["stop_pass_stale"] = pinned_stat(topo, "pass_stale") - stale
        resumed = wait_for(lambda: topo.status(check=False), timeout=10)
        out["stop_status_after"] = bool(resumed)
        out["stop_offloaded_after"] = bool(wait_for(lambda: offloaded(topo, "tcp", sport)))
        out["stop_moving_after"] = moving(topo, "tcp", sport)

        # A clean restart adopts the pinned flows: offloaded at once.
        topo.stop_agent()
        topo.start_agent(hook="xdp", nsenter=True, extra=extra)
        out["restart_adopted"] = "adopted" in topo.read_agent_log()
        out["restart_offloaded_at_once"] = bool(offloaded(topo, "tcp", sport))
        out["restart_moving_after"] = moving(topo, "tcp", sport)
        st = topo.status() or {}
        out["restart_pass_stale_total"] = st.get("datapath", {}).get("pass_stale")
    finally:
        out["transfer"] = transfer.join(timeout=150)
        topo.stop_agent()
        subprocess.run(["rm", "-rf", pin_dir(topo)], check=False)
    return out
