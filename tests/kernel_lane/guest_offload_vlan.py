"""Runs INSIDE the 6.1 kernel lane: the agent offloads over a real 802.1Q VLAN
(`rw0.7`, XDP and TC) and a VLAN-filtering bridge (`brw.7`, XDP and TC), and SQM (cake,
ifb, as sqm-scripts sets it up) shapes offloaded traffic with the TC hook. One half of
the agent-offload cases; guest_offload_qinq_pppoe.py, booted beside it, has the other.
Also SQM's upload shaping (cake on rw0.7) with the hybrid hook.
What each case runs and checks: offload_cases.py (run_flows, check_flows, _case).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time

import pytest

from .topology import (
    Topology,
    ip,
    require_guest,
    sh,
    vlan_bridge_topology,
    vlan_topology,
)

require_guest()

from .offload_cases import (  # noqa: E402  (after the guard)
    Agent,
    _case,
    _connect_pair,
    _find,
    _norm,
    bpffs,  # noqa: F401  (the module's autouse fixture: pytest finds it here)
    prepare_hosts,
    running_agent,
    status,
)


@pytest.fixture(scope="module")
def vlan():
    with vlan_topology(vid=7, nat=True, nat6=False) as topo:
        yield topo


@pytest.fixture(scope="module")
def vlan_tc_hand_on(vlan):
    """Where test_sqm_tc_shapes_offloaded_traffic leaves its running TC agent for
    test_vlan_offload[tc] (which stops it); stopped here if that never ran."""
    box: dict = {}
    yield box
    agent = box.pop("agent", None)
    if agent is not None:
        agent.stop()


# --------------------------------------------------------------------------- SQM

# Rates far below what the lane forwards unshaped (about 100 Mbit/s of TCP under
# emulation on a quiet host; with other guests on the same 2 CPUs a Python receiver
# still took 3 Mbit/s offloaded but the ifb's kernel path only ~1.3 Mbit/s, and on
# a slower host 1.18 Mbit/s against a 1.5 Mbit/s cake: CI, 2026-12-03), each
# different, so a measurement shows which shaper held it.
SQM_UP_KBIT = int(os.environ.get("KERNEL_LANE_SQM_UP_KBIT", "1000"))  # cake on the WAN
SQM_DOWN_KBIT = int(os.environ.get("KERNEL_LANE_SQM_DOWN_KBIT", "700"))  # cake on the ifb
SQM_LAN_KBIT = int(os.environ.get("KERNEL_LANE_SQM_LAN_KBIT", "1200"))  # cake on rl0
SQM_SECONDS = 3  # measured, after the bulk's first quarter (about 1 s) left out
SQM_TOLERANCE = 0.10
IFB = "ifb4wan"


def _tc(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    # `tc -n` (not nsenter): nothing here needs the BPF filesystem
    return sh(["tc", "-n", ns, *args], check=check)


def sqm_scripts_setup(ns: str, wan: str, up_kbit: int, down_kbit: int) -> list[tuple]:
    """What sqm-scripts' piece_of_cake.qos does on `wan` (egress(), ingress()):
    cake at the upload rate as the root qdisc; an `ingress` qdisc, an ifb with
    cake at the download rate, and a u32 filter at prio 10 redirecting every
    packet arriving on `wan` to the ifb. Returns (command, rc, stderr) each."""
    cmds = [
        ("tc", f"qdisc add dev {wan} root cake bandwidth {up_kbit}kbit besteffort"),
        ("ip", f"link add {IFB} type ifb"),
        ("tc", f"qdisc del dev {wan} handle ffff: ingress"),  # sqm: SILENT, may fail
        ("tc", f"qdisc add dev {wan} handle ffff: ingress"),
        ("tc", f"qdisc add dev {IFB} root cake bandwidth {down_kbit}kbit besteffort"),
        ("ip", f"link set dev {IFB} up"),
        ("tc", f"filter add dev {wan} parent ffff: protocol all prio 10 u32 match u32 0 0 "
               f"flowid 1:1 action mirred egress redirect dev {IFB}"),
    ]
    out = []
    for tool, c in cmds:
        cp = sh([tool, "-n", ns, *c.split()], check=False)
        out.append((f"{tool} {c}", cp.returncode, cp.stderr.strip()))
    return out


def sqm_teardown(ns: str, wan: str) -> None:
    """What sqm-scripts' stop does (and the ifb gone), each step allowed to fail."""
    _tc(ns, "qdisc", "del", "dev", wan, "root", check=False)
    _tc(ns, "qdisc", "del", "dev", wan, "ingress", check=False)
    ip(ns, "link", "del", IFB, check=False)


def _qdisc_bytes(ns: str, dev: str) -> int:
    out = json.loads(_tc(ns, "-s", "-j", "qdisc", "show", "dev", dev, "root").stdout or "[]")
    return sum(q.get("bytes", 0) for q in out)


def _ingress_filters(ns: str, dev: str) -> list[tuple[int, str]]:
    """(pref, kind) of the filters at `dev`'s ingress, in the order they run."""
    out = json.loads(_tc(ns, "-j", "filter", "show", "dev", dev, "ingress").stdout or "[]")
    return sorted({(f["pref"], f["kind"]) for f in out if "pref" in f})


def shaped_transfer(topo: Topology, agent: Agent, direction: str, port: int, kbit: int,
                    offload: bool = True) -> dict:
    """One TCP connection from the LAN host; data one way only, LAN -> far host
    ("up") or back ("down"). With `offload`, small writes (1200 B every 50 ms)
    go first until the agent's status shows the data direction offloaded; then
    the bulk, unpaced: as much as the shaper passes in SQM_SECONDS + 1 s at
    `kbit`. The receiver timestamps what arrives; the rate is measured over the
    bulk after its first quarter (TCP's slow start, cake's queue filling), in
    the bytes cake counts (Ethernet frames: 1514 per 1448 of payload). Returns
    the rate, the segments measured, and how many packets the data direction's
    offloaded flow carried from the start of the bulk to its end (before FIN)."""
    ns = topo.router_ns
    bulk = int(kbit * 1000 / 8 * (SQM_SECONDS + 1) * 1448 / 1514)
    data = os.urandom(bulk)
    cli, srv, peer = _connect_pair(topo, 4, "tcp", port, 30.0)
    send, recv = (cli, srv) if direction == "up" else (srv, cli)
    key = (("tcp", _norm(topo.lan_addr), cli.getsockname()[1], _norm(topo.wan_addr))
           if direction == "up" else ("tcp", _norm(topo.wan_addr), port, _norm(peer[0])))
    arrivals: list[tuple[float, int]] = []
    got = bytearray()
    warm = 0
    deadline = time.monotonic() + 60 + 4 * SQM_SECONDS

    def receive() -> None:
        with contextlib.suppress(OSError):
            for _ in range(1_000_000):
                if len(got) >= warm + bulk and warm_done.is_set():
                    break
                if time.monotonic() > deadline:
                    break
                b = recv.recv(65536)
                if not b:
                    break
                got.extend(b)
                arrivals.append((time.monotonic(), len(got)))

    warm_done = threading.Event()
    th = threading.Thread(target=receive, daemon=True)
    th.start()
    row0 = None
    try:
        for _ in range(600 if offload else 0):  # bounded: 600 x 50 ms
            row0 = _find(status(ns), *key)
            if row0 and row0["state"] == "offloaded":
                break
            send.sendall(b"w" * 1200)
            warm += 1200
            time.sleep(0.05)
        warm_done.set()
        send.sendall(data)
        th.join(timeout=max(1.0, deadline - time.monotonic()))
        row1 = _find(status(ns), *key)  # everything arrived, no FIN yet
    finally:
        cli.close()
        srv.close()
    assert bytes(got[warm:]) == data, f"{direction}: {len(got) - warm} of {bulk} bytes intact"
    start = warm + bulk // 4
    t0 = next(t for t, n in arrivals if n >= start)
    t1 = arrivals[-1][0]
    measured = len(got) - start
    kbit_l2 = measured * 8 / (t1 - t0) / 1000 * 1514 / 1448
    carried = 0
    if row0 and row1 and row1["state"] == "offloaded":
        carried = row1["packets"] - (row0["packets"] if row0["state"] == "offloaded" else 0)
    elif row1 and row1["state"] == "offloaded":
        carried = row1["packets"]
    return {"direction": direction, "l2_kbit": round(kbit_l2), "seconds": round(t1 - t0, 2),
            "bytes": bulk, "segments": -(-bulk // 1448), "carried": carried,
            "warmup_bytes": warm, "row": row1}


def test_sqm_tc_shapes_offloaded_traffic(vlan, vlan_tc_hand_on):
    """SQM as sqm-scripts sets it up on the WAN (rw0.7 here: cake at the upload
    rate on its egress, an ingress qdisc redirecting to ifb4wan with cake at the
    download rate), the agent with hook tc, one agent start:

    1. Where a clsact exists (the agent creates one and leaves it when it
       stops), sqm-scripts cannot set up its download shaping: its `ingress`
       qdisc and redirect filter fail (docs/openwrt.md). The documented remedy
       (delete the clsact, then start SQM) works.
    2. The agent started after SQM puts its filter (pref 65280) after SQM's
       redirect (pref 10): the download is held to the ifb's rate, the ifb's
       cake saw all of it, and the kernel forwarded it (ifb re-injects past the
       tc ingress hook, so the agent never sees it and its flow carries ~0).
       The upload is offloaded and held to the rate of cake on rw0.7 (the TC
       program redirects into rw0.7's transmit path, qdisc included).
    3. The documented setup for offloaded downloads (docs/openwrt.md: no
       download shaping on the WAN, cake at the download rate on the egress of
       the device downloads leave by): SQM's redirect filter and the ifb are
       removed, leaving the agent's filter alone at the WAN ingress, as when
       SQM runs with download rate 0 (then no ingress qdisc is made and the
       agent's clsact holds the same hook); cake on rl0. The download is
       offloaded and held to that rate, and rl0's cake saw all of it.

    Each measurement is one TCP connection, data one way: small writes until
    the agent shows the data direction offloaded (no wait for the ifb case),
    then an unpaced bulk the shaper must hold (shaped_transfer). "Offloaded":
    that flow's packet counter carried at least 90 % of the bulk's segments,
    read when the bulk started and once it had arrived, before FIN.

    Once all of it has passed, the agent stays running for test_vlan_offload[tc]
    (next): the cakes on rw0.7 and rl0 are removed, SQM's ingress qdisc stays,
    holding the agent's filter (one agent start under emulation, 30-60 s, less).
    """
    topo, ns, wan, lan_if = vlan, vlan.router_ns, vlan.router_wan_if, vlan.router_lan_if
    for m in ("sch_cake", "ifb", "act_mirred", "cls_u32"):
        sh(["modprobe", m])
    prepare_hosts(topo, "tc")
    up, down, lan_rate = SQM_UP_KBIT, SQM_DOWN_KBIT, SQM_LAN_KBIT
    rates: dict[str, tuple[dict, int]] = {}

    def measure(name: str, direction: str, port: int, kbit: int, offload: bool = True) -> dict:
        got = shaped_transfer(topo, agent, direction, port, kbit, offload=offload)
        rates[name] = (got, kbit)
        print(f"SQM {name}: configured {kbit} kbit/s, measured {got['l2_kbit']} kbit/s "
              f"over {got['seconds']} s, offloaded flow carried {got['carried']} of "
              f"{got['segments']} segments (warm-up {got['warmup_bytes']} B)")
        return got

    try:
        # 1: a clsact left behind by an agent blocks sqm-scripts' `ingress` qdisc
        _tc(ns, "qdisc", "replace", "dev", wan, "clsact")
        blocked = sqm_scripts_setup(ns, wan, up, down)
        failed = [c for c, rc, _ in blocked if rc != 0]
        assert f"tc qdisc add dev {wan} handle ffff: ingress" in failed, blocked
        assert any(c.startswith(f"tc filter add dev {wan}") for c in failed), blocked
        _tc(ns, "qdisc", "del", "dev", wan, "clsact")  # the documented remedy
        sqm_teardown(ns, wan)
        done = sqm_scripts_setup(ns, wan, up, down)
        assert [c for c, rc, _ in done if rc != 0] == [
            f"tc qdisc del dev {wan} handle ffff: ingress"], done  # nothing to delete yet

        with running_agent(topo, "tc", "vlan-tc", hand_on=vlan_tc_hand_on) as agent:
            agent.wait_ready()
            # 2: the agent attached after SQM, its filter after SQM's redirect
            order = _ingress_filters(ns, wan)
            assert order == [(10, "u32"), (0xFF00, "bpf")], order
            got = measure("upload, offloaded, cake on rw0.7", "up", 5800, up)
            assert got["carried"] >= 0.9 * got["segments"], (got, agent.tail())
            ifb0 = _qdisc_bytes(ns, IFB)
            got = measure("download via ifb4wan (kernel path)", "down", 5802, down,
                          offload=False)
            ifb_bytes = _qdisc_bytes(ns, IFB) - ifb0
            assert ifb_bytes >= got["bytes"], (ifb_bytes, got)  # the ifb's cake saw it all
            assert got["carried"] <= 0.05 * got["segments"], got  # the kernel forwarded it

            # 3: the documented setup: no ifb, cake on the LAN device's egress
            _tc(ns, "filter", "del", "dev", wan, "parent", "ffff:", "prio", "10")
            ip(ns, "link", "del", IFB)
            assert _ingress_filters(ns, wan) == [(0xFF00, "bpf")]
            _tc(ns, "qdisc", "add", "dev", lan_if, "root", "cake", "bandwidth",
                f"{lan_rate}kbit", "besteffort")
            lan0 = _qdisc_bytes(ns, lan_if)
            got = measure("download, offloaded, cake on rl0", "down", 5804, lan_rate)
            lan_bytes = _qdisc_bytes(ns, lan_if) - lan0
            assert got["carried"] >= 0.9 * got["segments"], (got, agent.tail())
            assert lan_bytes >= got["bytes"], (lan_bytes, got)  # rl0's cake saw it all
            off = {n: (g["l2_kbit"], k) for n, (g, k) in rates.items()
                   if abs(g["l2_kbit"] / k - 1) > SQM_TOLERANCE}
            assert not off, f"not held to the shaper's rate (+-{SQM_TOLERANCE:.0%}): {off}"
    finally:
        if "agent" in vlan_tc_hand_on:  # handed on: no shaping, the agent's filter stays
            _tc(ns, "qdisc", "del", "dev", wan, "root")
            _tc(ns, "qdisc", "del", "dev", lan_if, "root")
        else:
            sqm_teardown(ns, wan)
            _tc(ns, "qdisc", "del", "dev", lan_if, "root", check=False)
            _tc(ns, "qdisc", "del", "dev", wan, "clsact", check=False)


@pytest.mark.parametrize("hook", ["tc", "xdp"])
def test_vlan_offload(vlan, vlan_tc_hand_on, hook):
    """TC first: the agent test_sqm_tc_shapes_offloaded_traffic handed on (its
    shapers removed), when that case ran and passed, else a new one; XDP: a new
    one."""
    given = vlan_tc_hand_on.pop("agent", None) if hook == "tc" else None
    try:
        _case(vlan, hook, f"vlan-{hook}", 5600 if hook == "xdp" else 5610, given=given)
    finally:
        if given is not None:  # SQM's ingress qdisc, kept for the agent's filter
            _tc(vlan.router_ns, "qdisc", "del", "dev", vlan.router_wan_if, "ingress",
                check=False)


def test_sqm_hybrid_sends_an_offloaded_upload_through_cake(vlan):
    """After test_vlan_offload (its agents stopped: one agent on the topology at a
    time). hook hybrid (what auto picks on a NIC with native XDP: XDP and TC on the
    lowest devices rl0 and rw0) with sqm-scripts' upload shaping, cake on the
    VLAN device rw0.7 above rw0: the agent sees the shaper on the way out and
    resolves the upload as hook tc does, into rw0.7, and TC forwards it through
    rw0.7's transmit path, cake included (an XDP redirect into rw0 would go
    past it). The upload is offloaded, via TC into rw0.7, held to cake's rate,
    and cake counted all of it (docs/design.md, "Shapers under the hybrid
    hook")."""
    topo, ns, wan = vlan, vlan.router_ns, vlan.router_wan_if
    sh(["modprobe", "sch_cake"])
    prepare_hosts(topo, "hybrid")
    _tc(ns, "qdisc", "add", "dev", wan, "root", "cake", "bandwidth", f"{SQM_UP_KBIT}kbit",
        "besteffort")
    try:
        with running_agent(topo, "hybrid", "vlan-hybrid-sqm") as agent:
            agent.wait_ready()
            before = _qdisc_bytes(ns, wan)
            got = shaped_transfer(topo, agent, "up", 5820, SQM_UP_KBIT)
            counted = _qdisc_bytes(ns, wan) - before
            print(f"SQM hybrid upload: configured {SQM_UP_KBIT} kbit/s, measured "
                  f"{got['l2_kbit']} kbit/s, offloaded flow carried {got['carried']} of "
                  f"{got['segments']} segments, cake counted {counted} bytes")
            row = got["row"]
            assert row and (row.get("via"), row.get("out_dev")) == ("tc", wan), (row, agent.tail())
            assert got["carried"] >= 0.9 * got["segments"], (got, agent.tail())
            assert counted >= got["bytes"], (counted, got)  # cake saw all of it
            assert abs(got["l2_kbit"] / SQM_UP_KBIT - 1) <= SQM_TOLERANCE, got
            shapers = (status(ns) or {}).get("shapers")
            assert {"device": wan, "qdisc": "cake"} in shapers, shapers
    finally:
        _tc(ns, "qdisc", "del", "dev", wan, "root", check=False)


@pytest.fixture(scope="module")
def vlan_bridge():
    with vlan_bridge_topology(vid=7, nat=True, nat6=False) as topo:
        yield topo


@pytest.mark.parametrize("hook", ["xdp", "tc"])
def test_vlan_filtering_bridge_offload(vlan_bridge, hook):
    """The WAN VLAN on a VLAN-filtering bridge (brw.7 over brw, rw0 a tagged
    port): XDP finds the port through the bridge's FDB with the VLAN and writes
    the tag the port needs; TC redirects into brw.7."""
    _case(vlan_bridge, hook, f"vlan-bridge-{hook}", 5700 if hook == "xdp" else 5710)
