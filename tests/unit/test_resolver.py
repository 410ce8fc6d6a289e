"""The resolver's walk over device stacks this kernel cannot build.

FIXTURES, not a real kernel: the netlink link attributes and the sysfs files
below are written after two real OpenWrt 24.10 devices (a MediaTek MT7621
board whose switch uses the "mtk" tag, and a Qualcomm IPQ40xx board with a
qca8k switch using the "qca" tag), plus a VLAN/QinQ/PPPoE WAN. A fake
IPRoute answers link, route, neighbour and FDB queries from them. What runs
for real is our resolver code; VLAN and PPPoE are also exercised end to end
on a real 6.1 kernel in tests/kernel_lane.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest

from offloader.errors import ResolveError
from offloader.routing import Resolver, attach_points
from tests.unit.fakes import FakeIPRoute, key, link, sysfs

LAN_HOST_MAC = "aa:00:00:00:00:02"
UPSTREAM_MAC = "bb:00:00:00:00:01"
PPPOE_PEER = "cc:00:00:00:00:01"


@pytest.fixture
def mt7621(tmp_path: Path) -> Resolver:
    """MediaTek MT7621 (e.g. a Xiaomi or Netgear board on OpenWrt 24.10):
    conduit eth0 (mtk_soc_eth), user ports lan1..lan4 = switch ports 1..4 in
    br-lan, wan = port 0 carrying 802.1Q VLAN 7 (wan.7) with PPPoE on top."""
    links = [
        link(2, "eth0", mtu=1504),
        link(3, "lan1", master=10, lower=2), link(4, "lan2", master=10, lower=2),
        link(5, "lan3", master=10, lower=2), link(6, "lan4", master=10, lower=2),
        link(7, "wan", lower=2),
        link(10, "br-lan", kind="bridge", mac="02:11:22:33:44:55"),
        link(11, "wan.7", kind="vlan", lower=7,
             data={"IFLA_VLAN_ID": 7, "IFLA_VLAN_PROTOCOL": 0x8100}),
        link(12, "pppoe-wan", ifi_type=512, mtu=1492, mac="00:00:00:00:00:00"),
    ]
    ipr = FakeIPRoute(
        links,
        routes={"198.51.100.9": (12, None), "198.18.1.2": (10, None)},
        neigh={(10, "198.18.1.2"): LAN_HOST_MAC},
        fdb={(10, LAN_HOST_MAC): 4},
    )
    root = sysfs(tmp_path / "sys", {"eth0": "mtk"},
                 {"lan1": 1, "lan2": 2, "lan3": 3, "lan4": 4, "wan": 0})
    proc = tmp_path / "pppoe"
    # /proc/net/pppoe as the kernel prints it on x86 (session 0x1234 in network order)
    proc.write_text("Id       Address              Device\n"
                    f"{socket.htons(0x1234):08X} {PPPOE_PEER} wan.7\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "pppoe-wan").write_text(PPPOE_PEER + "\n")
    return Resolver(ipr, sysfs=root, pppoe_proc=proc, pppoe_run=run)  # type: ignore[arg-type]


@pytest.fixture
def ipq40xx(tmp_path: Path) -> Resolver:
    """Qualcomm IPQ40xx with a qca8k switch: conduit eth0, lan1..lan4 = ports
    1..4 in br-lan, wan = port 5 with a plain IPv4/IPv6 uplink; plus a QinQ
    uplink eth1.100.7 (802.1ad 100 outside, 802.1Q 7 inside)."""
    links = [
        link(2, "eth0", mtu=1504),
        link(3, "lan1", master=10, lower=2), link(4, "lan2", master=10, lower=2),
        link(7, "wan", lower=2),
        link(10, "br-lan", kind="bridge"),
        link(20, "eth1"),
        link(21, "eth1.100", kind="vlan", lower=20,
             data={"IFLA_VLAN_ID": 100, "IFLA_VLAN_PROTOCOL": 0x88A8}),
        link(22, "eth1.100.7", kind="vlan", lower=21,
             data={"IFLA_VLAN_ID": 7, "IFLA_VLAN_PROTOCOL": 0x8100}),
    ]
    ipr = FakeIPRoute(
        links,
        routes={"198.51.100.9": (7, "198.19.0.1"), "2001:db8:ff::9": (22, "2001:db8:ee::1"),
                "198.18.1.2": (10, None)},
        neigh={(7, "198.19.0.1"): UPSTREAM_MAC, (22, "2001:db8:ee::1"): UPSTREAM_MAC,
               (10, "198.18.1.2"): LAN_HOST_MAC},
        fdb={(10, LAN_HOST_MAC): 3},
    )
    root = sysfs(tmp_path / "sys", {"eth0": "qca"}, {"lan1": 1, "lan2": 2, "wan": 5})
    return Resolver(ipr, sysfs=root, pppoe_proc=tmp_path / "none", pppoe_run=tmp_path)  # type: ignore[arg-type]


def test_mtk_bridge_port_egress(mt7621: Resolver) -> None:
    eg = mt7621.resolve(key(12, "198.51.100.9", "198.51.100.1"), ipaddress.ip_address("198.18.1.2"))
    assert eg.oif == 2  # the conduit, not the bridge or the user port
    assert eg.l2.dsa_proto == 1 and eg.l2.dsa_port == 2  # mtk, lan2 = port 2
    assert eg.l2.dmac == bytes.fromhex(LAN_HOST_MAC.replace(":", ""))
    assert eg.l2.smac == bytes.fromhex("021122334455")  # the bridge's MAC
    assert eg.l2.vlans == () and eg.l2.pppoe_sid == 0
    assert eg.mtu == 1500


def test_mtk_pppoe_over_vlan_egress(mt7621: Resolver) -> None:
    eg = mt7621.resolve(key(2, "198.18.1.2", "198.51.100.9", dsa_port=2),
                        ipaddress.ip_address("198.51.100.9"))
    assert eg.oif == 2  # eth0, through wan.7 and the wan user port
    assert eg.l2.pppoe_sid == 0x1234
    assert eg.l2.dmac == bytes.fromhex(PPPOE_PEER.replace(":", ""))
    assert eg.l2.vlans == ((0x8100, 7),)
    assert (eg.l2.dsa_proto, eg.l2.dsa_port) == (1, 0)
    assert eg.mtu == 1492  # the ppp device's; Ethernet 1500 - 8 is the same


def test_mtk_ingress_maps_back(mt7621: Resolver) -> None:
    # A frame on the conduit from switch port 2 enters L3 on br-lan.
    assert mt7621.ingress(key(2, "198.18.1.2", "198.51.100.9", dsa_port=2)).l3_iif == 10
    # One from port 0 with VLAN 7 and PPPoE session 0x1234 enters on pppoe-wan.
    k = key(2, "198.51.100.9", "198.18.1.2", dsa_port=0, vlan_outer=7, pppoe_sid=0x1234)
    assert mt7621.ingress(k).l3_iif == 12
    with pytest.raises(ResolveError):
        mt7621.ingress(key(2, "198.51.100.9", "198.18.1.2", dsa_port=0, vlan_outer=7,
                           pppoe_sid=0x999))


def test_mtk_attach_points(mt7621: Resolver) -> None:
    points = {(p.link.name, p.dsa_proto, p.l3)
              for p in attach_points(mt7621, ["br-lan", "pppoe-wan"])}
    assert points == {("eth0", 1, False)}  # everything rides on the conduit, mtk tagged
    # TC attaches above the encapsulations: the user ports and the ppp device.
    tc = {(p.link.name, p.dsa_proto, p.l3)
          for p in attach_points(mt7621, ["br-lan", "pppoe-wan"], full=False)}
    assert tc == {("lan1", 0, False), ("lan2", 0, False), ("lan3", 0, False),
                  ("lan4", 0, False), ("pppoe-wan", 0, True)}


def test_tc_egress_stops_above_the_encapsulation(mt7621: Resolver) -> None:
    """TC redirects into the ppp device (its qdisc, SQM, still applies) and
    into the DSA user port, plain Ethernet headers only."""
    eg = mt7621.resolve(key(4, "198.18.1.2", "198.51.100.9"),
                        ipaddress.ip_address("198.51.100.9"), full=False)
    assert eg.oif == 12 and eg.mtu == 1492
    assert eg.l2.vlans == () and eg.l2.pppoe_sid == 0 and eg.l2.dsa_proto == 0
    eg = mt7621.resolve(key(12, "198.51.100.9", "198.51.100.1"),
                        ipaddress.ip_address("198.18.1.2"), full=False)
    assert eg.oif == 4 and eg.l2.dsa_proto == 0  # lan2, the user port


def test_route_lookup_is_the_kernels_input_lookup(mt7621: Resolver) -> None:
    mt7621.resolve(key(2, "198.18.1.2", "198.51.100.9", dsa_port=2),
                   ipaddress.ip_address("198.51.100.9"))
    q = mt7621.ipr.route_queries[-1]  # type: ignore[attr-defined]
    assert q["iif"] == 10 and q["src"] == "198.18.1.2" and q["dst"] == "198.51.100.9"
    assert (q["ip_proto"], q["sport"], q["dport"]) == (6, 40000, 443)


def test_qca_wan_port_egress(ipq40xx: Resolver) -> None:
    eg = ipq40xx.resolve(key(2, "198.18.1.2", "198.51.100.9", dsa_port=1),
                         ipaddress.ip_address("198.51.100.9"))
    assert eg.oif == 2 and eg.l2.dsa_proto == 2 and eg.l2.dsa_port == 5
    assert eg.l2.dmac == bytes.fromhex(UPSTREAM_MAC.replace(":", ""))
    assert eg.nexthop == ipaddress.ip_address("198.19.0.1")


def test_qinq_egress_tags_outer_first(ipq40xx: Resolver) -> None:
    eg = ipq40xx.resolve(key(2, "2001:db8:1::2", "2001:db8:ff::9", dsa_port=1),
                         ipaddress.ip_address("2001:db8:ff::9"))
    assert eg.oif == 20
    assert eg.l2.vlans == ((0x88A8, 100), (0x8100, 7))
    assert eg.l2.dsa_proto == 0


def test_qinq_ingress(ipq40xx: Resolver) -> None:
    k = key(20, "2001:db8:ff::9", "2001:db8:1::2", vlan_outer=100, vlan_inner=7)
    assert ipq40xx.ingress(k).l3_iif == 22


def test_unknown_dsa_tag_protocol_is_refused(tmp_path: Path) -> None:
    ipr = FakeIPRoute([link(2, "eth0"), link(3, "lan1", lower=2)], {"198.18.1.2": (3, None)},
                      {(3, "198.18.1.2"): LAN_HOST_MAC}, {})
    root = sysfs(tmp_path / "sys", {"eth0": "brcm"}, {"lan1": 1})
    res = Resolver(ipr, sysfs=root)  # type: ignore[arg-type]
    with pytest.raises(ResolveError, match="not supported"):
        res.resolve(key(3, "198.18.1.3", "198.18.1.2"), ipaddress.ip_address("198.18.1.2"))


def test_several_pppoe_sessions_need_the_hook_record(tmp_path: Path) -> None:
    proc = tmp_path / "pppoe"
    proc.write_text("Id       Address              Device\n"
                    f"{socket.htons(1):08X} {PPPOE_PEER} eth1\n"
                    f"{socket.htons(2):08X} cc:00:00:00:00:02 eth1\n")
    ipr = FakeIPRoute([link(20, "eth1"), link(30, "ppp0", ifi_type=512),
                       link(31, "ppp1", ifi_type=512)], {"198.51.100.9": (31, None)}, {}, {})
    run = tmp_path / "run"
    run.mkdir()
    res = Resolver(ipr, sysfs=tmp_path, pppoe_proc=proc, pppoe_run=run)  # type: ignore[arg-type]
    with pytest.raises(ResolveError, match="PPPoE session"):
        res.resolve(key(20, "198.18.1.2", "198.51.100.9"), ipaddress.ip_address("198.51.100.9"))
    (run / "ppp1").write_text("cc:00:00:00:00:02\n")
    eg = res.resolve(key(20, "198.18.1.2", "198.51.100.9"), ipaddress.ip_address("198.51.100.9"))
    assert eg.l2.pppoe_sid == 2 and eg.oif == 20
