"""The control socket on the real kernel: it never stalls the agent's loop,
answers root only, and a squatter or a planted pin directory is named.

Clients run inside the router's namespace (an abstract address belongs to
the namespace it is bound in); `nobody` is uid 65534, through setpriv.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from offloader.lab import Topology, lab_network
from tests.conftest import need_root
from tests.integration.transfer import background_transfer
from tests.poll import poll

pytestmark = pytest.mark.root

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))

# Clients that do what a hostile or broken local program does, for SECONDS:
# 50 that connect and say nothing, one that sends its request a byte every
# 1.5 s, one that asks for status and reads the answer a byte every 1.5 s.
# Whoever the agent drops connects again, so the pressure lasts.
ATTACK = r"""
import json, select, socket, sys, time
ADDR = "\0ebpf-offloader/control"
end = time.monotonic() + float(sys.argv[1])
def conn():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(ADDR)
    s.setblocking(False)
    return s
silent = [conn() for _ in range(50)]
trickle, sent = conn(), 0
reader = conn(); reader.send(b'{"cmd": "status"}\n')
drops = reader_bytes = trickled = 0
print("ready", flush=True)
tick = time.monotonic()
while time.monotonic() < end:
    if time.monotonic() >= tick:
        tick += 1.5
        try:
            trickle.send(b'{"cmd": "status"}\n'[sent % 18:sent % 18 + 1]); sent += 1; trickled += 1
        except OSError:
            drops += 1; trickle.close(); trickle, sent = conn(), 0
        try:
            b = reader.recv(1)
            if b:
                reader_bytes += 1
            else:
                reader.close(); reader = conn(); reader.send(b'{"cmd": "status"}\n')
        except BlockingIOError:
            pass
    ready, _, _ = select.select(silent, [], [], 0.05)
    for s in ready:
        s.recv(4096)  # "timed out" and EOF: dropped by the agent
        silent[silent.index(s)] = conn(); s.close(); drops += 1
print(json.dumps({"drops": drops, "reader_bytes": reader_bytes, "trickled": trickled}), flush=True)
"""

# A squatter: binds the agent's address first and answers every client
# with a made-up report (LISTEN=0: bound only, never listening).
SQUATTER = r"""
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind("\0ebpf-offloader/control")
if os.environ.get("LISTEN", "1") == "1":
    s.listen(8)
print("bound", flush=True)
fake = {"running": True, "pid": 1, "interfaces": [], "flows": [],
        "counts": {"offloaded": 31337, "passed": 0, "pending": 0, "total": 31337}}
while True:
    if os.environ.get("LISTEN", "1") != "1":
        sys.stdin.read(); break
    c, _ = s.accept()
    try:
        c.recv(4096); c.sendall(json.dumps(fake).encode() + b"\n")
    except OSError:
        pass  # a client that does not believe us hangs up at once
    c.close()
"""


def _senders_plain(topo: Topology) -> None:
    for host in (topo.lan1, topo.lan2, topo.wan):
        host.sh("ethtool -K eth0 tso off gso off >/dev/null")


@pytest.fixture(scope="module")
def lab(bpf_object: Any) -> Iterator[Topology]:
    need_root()
    with lab_network() as topo:
        _senders_plain(topo)
        topo.start_agent(hook="xdp")
        yield topo


def _cli_as_nobody(topo: Topology, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(topo.router.argv(*NOBODY, sys.executable, "-m", "offloader.cli", *args),
                          capture_output=True, text=True, timeout=30, env=ENV)


def _flows(status: dict[str, Any] | None, proto: str, sport: int) -> list[dict[str, Any]]:
    return [f for f in (status or {"flows": []})["flows"]
            if f["proto"] == proto and f["sport"] == sport and f["state"] == "offloaded"]


def test_hostile_clients_never_stall_the_loop(lab: Topology) -> None:
    """50 silent clients, a trickling writer and a slow reader during an
    offloaded transfer: the heartbeat stays fresh (no fail-safe), the
    transfer stays offloaded, and status keeps answering."""
    size, rate = 36_000_000, 3_000_000  # about 12 s of TCP
    attack = lab.router.popen(sys.executable, "-c", ATTACK, "16", stdout=subprocess.PIPE, env=ENV)
    try:
        assert attack.stdout is not None
        assert attack.stdout.readline().strip() == "ready"
        est_before = lab.nft_counter("fwd_established")[0]
        t, result = background_transfer(lab, proto="tcp", family=4, size=size, rate_pps=rate,
                                        sport=41201, timeout=40)
        answered, failed, seen = 0, [], 0
        deadline = time.monotonic() + 40
        while t.is_alive() and time.monotonic() < deadline:
            proc = lab.cli("status", "--json", check=False)
            if proc.returncode == 0:
                answered += 1
                for f in _flows(json.loads(proc.stdout), "tcp", 41201):
                    seen = max(seen, f["packets"])
            else:
                failed.append(proc.stderr.strip())
            time.sleep(0.2)
        t.join(timeout=30)
        out, _ = attack.communicate(timeout=30)
    finally:
        if attack.poll() is None:
            attack.kill()
    st = lab.status()
    assert st is not None
    assert failed == [] and answered >= 5, (answered, failed)
    assert st["datapath"]["pass_stale"] == 0  # the fail-safe never engaged ...
    assert result.get("intact"), result
    assert seen > 0.5 * size / 1448, (seen, size)  # ... the transfer was offloaded ...
    assert lab.nft_counter("fwd_established")[0] - est_before < 0.4 * size / 1448
    # ... and the attack was real: silent clients were dropped at their
    # deadline and came back, the writer kept trickling, the reader read.
    lines = (out or "").strip().splitlines()
    report = json.loads(lines[-1]) if lines else {"attack output": out}
    assert report.get("drops", 0) >= 50 and report.get("trickled", 0) >= 5 \
        and report.get("reader_bytes", 0) >= 5, report


def test_nobody_can_neither_read_nor_flush(lab: Topology) -> None:
    t, out = background_transfer(lab, proto="udp", family=4, size=6_000_000, rate_pps=1000,
                                 timeout=20, sport=41202)
    try:
        before = poll(lambda: _flows(lab.status(), "udp", 41202))
        assert before, "the flow was never offloaded"
        for args in (("status", "--json"), ("status",), ("flush",)):
            proc = _cli_as_nobody(lab, *args)
            assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
            assert ("ControlRefused: permission denied: this agent answers only root; "
                    "uid 65534 is not allowed") in proc.stderr, proc.stderr
            assert "198.1" not in proc.stdout + proc.stderr  # no address leaked
        # The flush was refused: the same flow is still offloaded and carrying.
        after = poll(lambda: [f for f in _flows(lab.status(), "udp", 41202)
                               if f["packets"] > before[0]["packets"]])
        assert after, lab.status()
    finally:
        t.join(timeout=30)
    assert out.get("received", 0) > 0, out


@pytest.mark.parametrize("listen", [True, False], ids=["listening", "bound-only"])
def test_squatter_is_named(bpf_object: Any, listen: bool) -> None:
    need_root()
    with lab_network() as topo:
        squat = subprocess.Popen(topo.router.argv(*NOBODY, sys.executable, "-c", SQUATTER),
                                 stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True,
                                 env=dict(ENV, LISTEN="1" if listen else "0"))
        try:
            assert squat.stdout is not None
            assert squat.stdout.readline().strip() == "bound"
            held = f"the control address is held by uid 65534 (pid {squat.pid}), not a root agent"
            proc = topo.cli("status", "--json", check=False)
            assert proc.returncode == 1
            assert held in proc.stderr, proc.stderr
            assert "31337" not in proc.stdout
            with pytest.raises(RuntimeError, match="agent exited") as info:
                topo.start_agent(hook="xdp")
            log = topo.read_agent_log()
            assert "held by uid 65534" in log and "not a root agent" in log, log
            assert "another agent already runs" not in log
            assert topo.agent is not None and topo.agent.returncode not in (None, 0)
            assert str(info.value)
            # Refused before anything was attached.
            assert "xdp" not in topo.router.sh("ip -d link show").stdout
        finally:
            squat.kill()
            squat.wait(timeout=10)
            topo.agent = None


def test_planted_pin_directory_is_refused(bpf_object: Any) -> None:
    """A BPF filesystem that is 1777 (as this host's /sys/fs/bpf): a local
    user creates the agent's directory first. The agent (under nsenter
    --net, which sees that filesystem) refuses to start and names it. A
    fresh bpffs in a mount namespace of the test's own stands in for the
    host's, which other tests' pins share."""
    need_root()
    top = "/sys/fs/bpf/ebpf-offloader"
    with lab_network() as topo:
        run = " ".join([sys.executable, "-m", "offloader.cli", "run", "-i", "br-lan", "-i",
                        "wan0", "--hook", "xdp"])
        script = (f"mount -t bpf bpf /sys/fs/bpf && chmod 1777 /sys/fs/bpf && "
                  f"{' '.join(NOBODY)} mkdir -m 0755 {top} && "
                  f"nsenter --net=/run/netns/{topo.router.name} {run}; rc=$?; "
                  f"echo \"left:[$(ls -A {top})]\"; exit $rc")
        proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               script], capture_output=True, text=True, timeout=60, env=ENV)
        assert proc.returncode == 1, (proc.stdout, proc.stderr)
        assert (f"BpfError: pin directory {top} is a directory owned by uid 65534 with mode "
                "0755, not root's 0700") in proc.stderr, proc.stderr
        assert "left:[]" in proc.stdout  # nothing was pinned into it
        assert "xdp" not in topo.router.sh("ip -d link show").stdout  # nor attached
