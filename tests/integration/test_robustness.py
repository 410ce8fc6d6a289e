"""What a router meets every day, on the real kernel: a full flow map, a
second `run` next to a running agent, conntrack events lost in a storm."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from offloader.lab import WAN_4, Topology, lab_network
from tests.conftest import need_root
from tests.poll import poll

pytestmark = pytest.mark.root

# Many UDP conversations from lan1, each a few datagrams a second for a
# bounded time; the WAN host answers each one (so conntrack sees replies).
_CHATTER = r"""
import os, selectors, socket, sys, time
host, base, count, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
socks = []
for i in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", base + i)); s.setblocking(False); socks.append(s)
end = time.monotonic() + seconds
while time.monotonic() < end:
    for s in socks:
        try:
            s.sendto(b"x" * 64, (host, 9100))
        except BlockingIOError:
            pass
    time.sleep(0.3)
"""

_ECHO = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 9100))
s.settimeout(0.5); end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    try:
        data, peer = s.recvfrom(2048)
        s.sendto(data, peer)
    except socket.timeout:
        pass
"""


def _chatter(topo: Topology, base: int, count: int, seconds: float) -> subprocess.Popen[str]:
    return topo.lan1.popen(sys.executable, "-c", _CHATTER, WAN_4, str(base), str(count),
                           str(seconds))


def _echo(topo: Topology, seconds: float) -> subprocess.Popen[str]:
    return topo.wan.popen(sys.executable, "-c", _ECHO, str(seconds))


@pytest.fixture
def lab(bpf_object: Any) -> Iterator[Topology]:
    need_root()
    with lab_network() as topo:
        yield topo
        topo.stop_agent()


def test_a_full_flow_map_leaves_new_connections_with_the_kernel(lab: Topology) -> None:
    lab.start_agent(hook="xdp", extra=["-o", "max_flows=1024"])
    echo = _echo(lab, 30)
    chat = _chatter(lab, 20000, 700, 12)  # 700 conversations, 1,400 directions
    try:
        def full() -> bool:
            st = lab.status() or {}
            return bool(st.get("agent", {}).get("map_full_refused", 0) > 0)

        assert poll(full, timeout=20), lab.read_agent_log()[-3000:]
        st = lab.status()
        assert st is not None and st["flows_max"] == 1024 and st["flows_used"] <= 1024
        assert st["counts"]["offloaded"] > 900
        # A connection that arrives now still works: through the kernel.
        result = lab.transfer(proto="udp", family=4, size=200_000, rate_pps=2000, sport=45000)
        assert result["intact"], result
        assert lab.agent is not None and lab.agent.poll() is None, "the agent stopped"
        log = lab.read_agent_log()
        assert log.count("flow map full") == 1, log[-3000:]  # at most once a minute
        assert "Traceback" not in log
    finally:
        chat.kill()
        echo.kill()
        chat.wait()
        echo.wait()


def test_a_second_run_changes_nothing(lab: Topology) -> None:
    lab.start_agent(hook="xdp", nsenter=True)
    before = lab.status()
    assert before is not None and before["pinned"]
    pins = sorted(os.listdir(before["pinned"]))
    inode = {n: os.stat(os.path.join(before["pinned"], n)).st_ino for n in pins}
    second = subprocess.run(
        ["nsenter", f"--net=/run/netns/{lab.router.name}", sys.executable, "-m", "offloader.cli",
         "run", "-i", "br-lan", "-i", lab.wan_if, "--hook", "xdp", "-o", "max_flows=131072"],
        capture_output=True, text=True, timeout=30,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert second.returncode != 0
    assert "another agent" in second.stderr, second.stderr
    assert "replacing" not in second.stderr, second.stderr
    after = lab.status()
    assert after is not None and after["pid"] == before["pid"]
    assert sorted(os.listdir(before["pinned"])) == pins
    assert {n: os.stat(os.path.join(before["pinned"], n)).st_ino for n in pins} == inode
    assert [i["name"] for i in after["interfaces"]] == [i["name"] for i in before["interfaces"]]
    assert after["flows_max"] == before["flows_max"]


_STORM = r"""
import socket, sys, time
# New conntrack entries as fast as one socket makes them: UDP to many ports.
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setblocking(False)
end = time.monotonic() + float(sys.argv[2]); port = 1
while time.monotonic() < end:
    for _ in range(2000):
        port = port % 60000 + 1
        try:
            s.sendto(b"", (sys.argv[1], port))
        except BlockingIOError:
            pass
"""


def test_lost_destroy_events_are_reconciled(lab: Topology) -> None:
    # A small event buffer (test hook) so that a storm overflows it.
    os.environ["EBPF_OFFLOADER_CT_RCVBUF"] = "4096"
    try:
        lab.start_agent(hook="xdp")
    finally:
        del os.environ["EBPF_OFFLOADER_CT_RCVBUF"]
    echo = _echo(lab, 40)
    chat = _chatter(lab, 30000, 10, 30)
    try:
        def offloaded() -> list[dict[str, Any]]:
            st = lab.status() or {"flows": []}
            return [f for f in st["flows"] if f["state"] == "offloaded" and f["proto"] == "udp"
                    and 30000 <= f["sport"] < 30010]

        assert poll(lambda: len(offloaded()) == 10, timeout=15), lab.status()
        storm = lab.lan2.popen(sys.executable, "-c", _STORM, WAN_4, "3")
        time.sleep(0.5)  # the storm is the stimulus: delete while it runs
        lab.router.sh("conntrack -D -p udp --sport 30000:30009 >/dev/null 2>&1", check=False)
        lab.router.sh("conntrack -D -p udp --dport 30000:30009 >/dev/null 2>&1", check=False)
        storm.wait(timeout=30)
        st = lab.status()
        assert st is not None and st["agent"]["conntrack_event_overflows"] > 0, \
            "the storm did not overflow the event socket"

        def reconciled() -> bool:
            st = lab.status() or {"agent": {}}
            return bool(st["agent"].get("conntrack_reconciles", 0) >= 1)

        assert poll(reconciled, timeout=20), lab.read_agent_log()[-3000:]

        # No flow of the deleted connections bypasses the firewall any more:
        # the kernel sees their packets again, so conntrack has all ten back.
        # (A flow left offloaded without its entry would keep conntrack from
        # ever seeing that conversation again.)
        def all_back() -> bool:
            out = lab.router.sh("conntrack -L -p udp --dport 9100 2>/dev/null").stdout
            ports = {int(w.split("=")[1]) for line in out.splitlines()
                     for w in line.split() if w.startswith("sport=")}
            return all(p in ports for p in range(30000, 30010))

        assert poll(all_back, timeout=15), lab.router.sh("conntrack -L -p udp --dport 9100").stdout
    finally:
        chat.kill()
        echo.kill()
        chat.wait()
        echo.wait()
