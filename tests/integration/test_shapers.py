"""Shapers and the hybrid hook on the real kernel: a qdisc on an offloaded
flow's way (SQM's cake, here tbf and an ifb redirect: this kernel has no
cake) sees every packet of it, because the flow is forwarded by TC, not XDP,
or left to the kernel where TC's path cannot reach the qdisc. The qdiscs'
own packet counters (`tc -s qdisc`) are the observable: an XDP redirect
never reaches a qdisc."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from offloader.lab import LAN1_4, WAN_4, Topology, lab_network
from tests.conftest import need_root

pytestmark = pytest.mark.root

TBF = "tbf rate 1gbit burst 1mb latency 100ms"  # counts, and holds back nothing here


@pytest.fixture(scope="module")
def lab(bpf_object: Any) -> Iterator[Topology]:
    need_root()
    with lab_network() as topo:
        topo.start_agent(hook="hybrid")
        yield topo
        topo.stop_agent()


def qdisc_packets(topo: Topology, dev: str, kind: str = "tbf") -> int:
    out = json.loads(topo.router.sh(f"tc -s -j qdisc show dev {dev}").stdout)
    return sum(int(q.get("packets", 0)) for q in out if q["kind"] == kind)


def passes(topo: Topology) -> int:
    st = topo.status()
    assert st is not None
    return int(st["agent"]["reresolve_passes"])


def add_qdisc(topo: Topology, cmd: str) -> None:
    """``tc qdisc add ...``, then wait until the agent has read the event:
    a qdisc change starts a re-resolve pass of every offloaded flow."""
    before = passes(topo)
    topo.router.sh(f"tc qdisc add {cmd}")
    deadline = time.monotonic() + 10
    while passes(topo) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert passes(topo) > before, "the agent never read the qdisc event"


def flow(topo: Topology, sport: int, src: str = LAN1_4) -> dict[str, Any] | None:
    for f in (topo.status() or {"flows": []})["flows"]:
        if (f["proto"], f["sport"], f["src"]) == ("udp", sport, src):
            return f  # type: ignore[no-any-return]
    return None


def in_background(topo: Topology, **kw: Any) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(topo.transfer(proto="udp", **kw)))
    t.start()
    return t, result


def watch(topo: Topology, sport: int, src: str = LAN1_4, **kw: Any) -> tuple[
        dict[str, Any], list[dict[str, Any]]]:
    """A UDP transfer, and the flow's status rows seen while it ran."""
    t, result = in_background(topo, sport=sport, **kw)
    rows: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    while t.is_alive() and time.monotonic() < deadline:
        if (f := flow(topo, sport, src)) is not None:
            rows.append(f)
        time.sleep(0.05)
    t.join(timeout=30)
    return result, rows


def test_a_shaper_on_the_lowest_egress_sees_every_offloaded_packet(lab: Topology) -> None:
    add_qdisc(lab, f"dev wan0 root {TBF}")
    try:
        st = lab.status()
        assert st is not None and st["shapers"] == [{"device": "wan0", "qdisc": "tbf"}], st
        before = qdisc_packets(lab, "wan0")
        result, rows = watch(lab, 41600, size=1_500_000, rate_pps=4000)
        assert result.get("intact"), result
        offloaded = [r for r in rows if r["state"] == "offloaded"]
        assert offloaded and {r["via"] for r in offloaded} == {"tc"}, rows
        forwarded = max(r["packets"] for r in offloaded)
        assert forwarded > 500, rows  # most of the 1,500 datagrams went by TC
        assert qdisc_packets(lab, "wan0") - before >= forwarded
    finally:
        lab.router.sh("tc qdisc del dev wan0 root", check=False)


def test_a_shaper_that_comes_later_gets_the_flow_from_xdp(lab: Topology) -> None:
    """SQM started while a flow is offloaded in XDP: the re-resolve pass the
    qdisc event starts moves it to TC, and the qdisc sees the rest of it."""
    t, result = in_background(lab, sport=41601, size=8_000_000, rate_pps=4000)
    try:
        deadline, f = time.monotonic() + 20, None
        while time.monotonic() < deadline:
            f = flow(lab, 41601)
            if f is not None and f["state"] == "offloaded" and f["packets"] > 100:
                break
            time.sleep(0.05)
        assert f is not None and f["state"] == "offloaded" and f["via"] is None, f
        add_qdisc(lab, f"dev wan0 root {TBF}")
        counted = qdisc_packets(lab, "wan0")  # first: what TC forwards after it is counted
        f = flow(lab, 41601)
        assert f is not None and f["via"] == "tc", f
        at_switch = f["packets"]
        t.join(timeout=60)
        assert result.get("intact"), result
        f = flow(lab, 41601)
        assert f is not None and f["packets"] > at_switch + 500, f
        assert qdisc_packets(lab, "wan0") - counted >= f["packets"] - at_switch
    finally:
        t.join(timeout=60)
        lab.router.sh("tc qdisc del dev wan0 root", check=False)


def test_a_shaper_on_the_bridge_keeps_the_flow_in_the_kernel(lab: Topology) -> None:
    """A download leaves by br-lan, whose TC path ends at the bridge port
    below a shaper on br-lan: passed, with its reason, and shaped."""
    add_qdisc(lab, f"dev br-lan root {TBF}")
    try:
        before = qdisc_packets(lab, "br-lan")
        result, rows = watch(lab, 41602, src=WAN_4, dnat=True, size=1_000_000, rate_pps=4000)
        assert result.get("intact"), result
        decided = [r for r in rows if r["state"] != "pending"]
        assert decided and {(r["state"], r["why"]) for r in decided} == {("passed", "shaped")}, rows
        st = lab.status()
        assert st is not None and st["agent"]["passed_by_reason"].get("shaped", 0) >= 1
        assert qdisc_packets(lab, "br-lan") - before >= 1000  # every datagram
    finally:
        lab.router.sh("tc qdisc del dev br-lan root", check=False)


def test_a_shaper_above_the_lowest_device_gets_the_tc_path_into_it(bpf_object: Any) -> None:
    """The WAN's addresses on a macvlan over wan0 (as pppoe-wan or wan.7 over
    the lowest device): with a shaper on the macvlan the flow is forwarded by
    TC into the macvlan's transmit path, as hook tc would, not by XDP into
    wan0 below it."""
    need_root()
    with lab_network(wan_macvlan=True) as topo:
        topo.router.sh(f"tc qdisc add dev wanm root {TBF}")
        topo.start_agent(hook="hybrid")
        try:
            before = qdisc_packets(topo, "wanm")
            result, rows = watch(topo, 41603, size=1_500_000, rate_pps=4000)
            assert result.get("intact"), result
            offloaded = [r for r in rows if r["state"] == "offloaded"]
            assert offloaded and {(r["via"], r["out_dev"]) for r in offloaded} == {
                ("tc", "wanm")}, rows
            forwarded = max(r["packets"] for r in offloaded)
            assert forwarded > 500, rows
            assert qdisc_packets(topo, "wanm") - before >= forwarded
        finally:
            topo.stop_agent()


def test_sqm_download_shaping_through_an_ifb_sees_offloaded_downloads(bpf_object: Any) -> None:
    """sqm-scripts' download shaping, as it sets it up (before the agent, see
    docs/openwrt.md): an ``ingress`` qdisc on the WAN with a u32 filter at
    prio 10 redirecting to an ifb, and the shaper on the ifb. With hybrid the
    download's verdict makes XDP pass it, so the redirect gets every packet
    (XDP forwarding would have gone past it)."""
    need_root()
    with lab_network() as topo:
        r = topo.router
        r.sh("ip link add ifb0 type ifb && ip link set ifb0 up"
             f" && tc qdisc add dev ifb0 root {TBF}"
             " && tc qdisc add dev wan0 handle ffff: ingress"
             " && tc filter add dev wan0 parent ffff: protocol all prio 10 u32 match u32 0 0"
             " flowid 1:1 action mirred egress redirect dev ifb0")
        topo.start_agent(hook="hybrid")
        try:
            before = qdisc_packets(topo, "ifb0")
            result, rows = watch(topo, 41604, src=WAN_4, dnat=True, size=1_000_000,
                                 rate_pps=4000)
            assert result.get("intact"), result
            offloaded = [r for r in rows if r["state"] == "offloaded"]
            assert offloaded and {r["via"] for r in offloaded} == {"tc"}, rows
            assert qdisc_packets(topo, "ifb0") - before >= 1000  # every datagram
            st = topo.status()
            assert st is not None and st["datapath"]["pass_hybrid"] >= 900  # XDP left them
            assert {(q["device"], q["qdisc"]) for q in st["shapers"]} == {
                ("ifb0", "tbf"), ("wan0", "ingress")}, st["shapers"]
        finally:
            topo.stop_agent()


def test_a_shaper_whose_rate_changes_starts_no_pass(lab: Topology) -> None:
    """cake-autorate changes cake's rate several times a second (`tc qdisc
    change`): each is a qdisc event, and none changes what decisions use. The
    agent counts the events that did (`qdisc_changes`); events are read in
    order, so once the later real change is counted the earlier ones were
    read and not counted."""
    add_qdisc(lab, f"dev wan0 root {TBF}")
    try:
        st = lab.status()
        assert st is not None
        before = st["agent"]["qdisc_changes"]
        for rate in ("900mbit", "800mbit", "700mbit"):
            lab.router.sh(f"tc qdisc change dev wan0 root tbf rate {rate} burst 1mb latency 100ms")
        lab.router.sh(f"tc qdisc add dev lan2p root {TBF}")  # a real change, after them
        deadline, now = time.monotonic() + 10, before
        while now == before and time.monotonic() < deadline:
            time.sleep(0.05)
            st = lab.status()
            assert st is not None
            now = st["agent"]["qdisc_changes"]
        assert now == before + 1, (before, now)
    finally:
        lab.router.sh("tc qdisc del dev wan0 root; tc qdisc del dev lan2p root", check=False)
