"""Runs INSIDE the 6.1 kernel lane (802.1Q needs CONFIG_VLAN_8021Q, absent on the host).

Proves with plain kernel forwarding that a router namespace whose WAN side is an
802.1Q sub-interface (and, second, a QinQ stack: 802.1ad outer + 802.1Q inner) carries
TCP payload intact both ways, IPv4 and IPv6, routed and NATed, and that the traffic
really crossed the VLAN devices (their byte counters).
"""

from __future__ import annotations

import os
import platform

import pytest

from .topology import (
    Sniffer,
    assert_exchange_intact,
    expected_peer,
    ip_json,
    link_stats,
    qinq_topology,
    require_guest,
    tcp_exchange,
    vlan_topology,
)

require_guest()


def test_running_on_second_kernel():
    assert platform.release().startswith("6.1."), platform.release()
    assert os.path.exists("/proc/net/vlan") or os.system("modprobe 8021q") == 0


def _vlan_info(ns: str, dev: str) -> dict:
    link = ip_json(ns, "-d", "link", "show", "dev", dev)[0]
    return link["linkinfo"]["info_data"]


def _check(topo, family: int) -> dict:
    before = link_stats(topo.router_ns, topo.router_wan_if)
    with Sniffer(topo.router_ns, topo.router_wan_lowest) as sn:
        res = tcp_exchange(topo, family=family, port=5200 + family)
        frames = sn.frames()
    # on the wire of rw0 every frame of the test's TCP flow carries exactly the
    # configured tag stack (other frames: the devices' own IPv6 link-local chatter)
    ip_type = 0x0800 if family == 4 else 0x86DD
    want = tuple((0x8100 if proto == "802.1Q" else 0x88A8, vid) for proto, vid in topo.tags)
    tcp = [f for f in frames if f.ip_proto == 6]
    assert len(tcp) >= 20, (len(frames), frames[:5])
    assert {(f.tags, f.ethertype) for f in tcp} == {(want, ip_type)}, {
        (f.tags, f.ethertype) for f in tcp}
    assert {f.outgoing for f in tcp} == {True, False}
    assert_exchange_intact(res)
    assert res["server"]["peer"] == expected_peer(topo, family), (res["server"], topo)
    after = link_stats(topo.router_ns, topo.router_wan_if)
    # the WAN device saw at least the payload each way (headers make it more)
    assert after["tx_bytes"] - before["tx_bytes"] >= res["up_bytes"], (before, after)
    assert after["rx_bytes"] - before["rx_bytes"] >= res["down_bytes"], (before, after)
    print(f"{topo.kind} {topo.router_wan_if} IPv{family} nat={topo.nat}: "
          f"{res['up_bytes']}+{res['down_bytes']} bytes intact in {res['client']['seconds']}s")
    return res


# one topology per test, both address families through it (each build costs seconds
# under software emulation)
@pytest.mark.parametrize("nat", [False, True], ids=["routed", "nat"])
def test_vlan_8021q_tcp_intact_ipv4_ipv6(nat):
    with vlan_topology(vid=7, nat=nat) as topo:
        info = _vlan_info(topo.router_ns, topo.router_wan_if)
        assert info["protocol"] == "802.1Q" and info["id"] == 7, info
        _check(topo, 4)
        _check(topo, 6)


def test_qinq_tcp_intact_ipv4_ipv6():
    with qinq_topology(svid=100, cvid=7) as topo:
        assert topo.router_wan_if == "rw0.100.7"
        outer = _vlan_info(topo.router_ns, "rw0.100")
        inner = _vlan_info(topo.router_ns, "rw0.100.7")
        assert (outer["protocol"], outer["id"]) == ("802.1ad", 100), outer
        assert (inner["protocol"], inner["id"]) == ("802.1Q", 7), inner
        s0 = link_stats(topo.router_ns, "rw0.100")
        _check(topo, 4)
        _check(topo, 6)
        # the outer (S-VLAN) device carried the same traffic
        s1 = link_stats(topo.router_ns, "rw0.100")
        assert s1["tx_bytes"] - s0["tx_bytes"] >= 2 * 2_000_000, (s0, s1)
        assert s1["rx_bytes"] - s0["rx_bytes"] >= 2 * 4_000_000, (s0, s1)


def test_namespaces_removed():
    """Every builder removes what it made (run last in this module)."""
    names = [n["name"] for n in ip_json(None, "netns", "list")]
    assert not [n for n in names if n.startswith("kl")], names
