"""The hybrid hook on the real kernel: XDP and TC on the same devices; a TCP
bulk transfer is handed to TC (after GRO), a UDP conversation stays in XDP,
both arrive intact and offloaded."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from offloader.lab import LAN1_4, Topology, lab_network
from tests.conftest import need_root

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def lab(bpf_object: Any) -> Iterator[Topology]:
    need_root()
    with lab_network() as topo:
        for host in (topo.lan1, topo.lan2, topo.wan):
            host.sh("ethtool -K eth0 tso off gso off >/dev/null")  # MTU-sized frames arrive
        topo.start_agent(hook="hybrid")
        yield topo
        topo.stop_agent()


def _watch(topo: Topology, proto: str, sport: int,
           **kw: Any) -> tuple[dict[str, Any], dict[Any, list[int]]]:
    """Run a transfer from lan1 and note, while it runs, how its offloaded
    flow was forwarded (status `via`: "tc" or None for XDP) and its packet
    counter each time."""
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(topo.transfer(proto=proto, sport=sport,
                                                                     **kw)))
    t.start()
    via: dict[Any, list[int]] = {}
    deadline = time.monotonic() + 60
    while t.is_alive() and time.monotonic() < deadline:
        for f in (topo.status() or {"flows": []})["flows"]:
            if (f["proto"], f["sport"], f["src"], f["state"]) == (proto, sport, LAN1_4,
                                                                 "offloaded"):
                via.setdefault(f.get("via"), []).append(f["packets"])
        time.sleep(0.05)
    t.join(timeout=30)
    return result, via


def test_every_device_gets_xdp_and_tc(lab: Topology) -> None:
    st = lab.status()
    assert st is not None
    assert {i["name"]: i["hook"] for i in st["interfaces"]} == {
        "lan1p": "hybrid", "lan2p": "hybrid", "wan0": "hybrid"}


def test_tcp_bulk_goes_to_tc_and_arrives_intact(lab: Topology) -> None:
    # Three seconds at least: the sweep (every second) hands it over past 1 MiB.
    result, via = _watch(lab, "tcp", 41500, size=24_000_000, rate_pps=8_000_000)
    assert result.get("intact"), result
    assert "tc" in via, via  # handed over once it had carried a megabyte
    assert max(via["tc"]) > min(via["tc"]), via  # and TC kept forwarding it
    st = lab.status()
    assert st is not None and st["agent"]["handed_to_tc"] >= 1
    assert st["datapath"]["pass_hybrid"] > 0  # XDP left its packets to TC
    assert st["datapath"]["pass_stale"] == 0


def test_udp_stays_in_xdp(lab: Topology) -> None:
    result, via = _watch(lab, "udp", 41501, size=1_500_000, rate_pps=4000)
    assert result.get("intact"), result
    assert set(via) == {None}, via  # offloaded, and forwarded by XDP only
    assert max(via[None]) > 0


def _tso(host: Any) -> str:
    out = host.sh("ethtool -k eth0").stdout
    return next(line.split(":")[1].split()[0] for line in out.splitlines()
                if line.startswith("tcp-segmentation-offload:"))


def test_auto_puts_tc_on_a_veth_and_its_peer_keeps_tso(bpf_object: Any) -> None:
    """``hook auto`` on veth ports: TC, not hybrid. A veth's native XDP
    turns TSO off on its peer (here the LAN host's eth0) and copies every
    skb into an XDP buffer; with TC the host keeps sending 64 KB segments,
    and the transfer is offloaded and intact."""
    need_root()
    with lab_network() as topo:
        assert _tso(topo.lan1) == "on"
        topo.start_agent(hook="auto")
        try:
            st = topo.status()
            assert st is not None
            assert {i["name"]: i["hook"] for i in st["interfaces"]} == {
                "lan1p": "tc", "lan2p": "tc", "wan0": "tc"}
            assert _tso(topo.lan1) == "on"
            result, via = _watch(topo, "tcp", 41510, size=24_000_000, rate_pps=8_000_000)
            assert result.get("intact"), result
            assert via and max(max(v) for v in via.values()) > 0, via  # offloaded, forwarded
        finally:
            topo.stop_agent()
