"""Each kind of device, walked down (egress), up (ingress) and for attaching.

FAKES, not a real kernel: the link, FDB, VLAN and address facts come from
tests/unit/fakes.py (this kernel has no 802.1Q, PPPoE or DSA devices and its
bridge cannot filter VLANs). One made-up router carries one device of each
kind; what runs is offloader/devstack.py through the Resolver.

    eth0             plain Ethernet WAN, addressed
    eth1 -> wanm     macvlan WAN (eth1 has no address)
    eth2 -> eth2.7   802.1Q VLAN 7 -> ppp0 (PPPoE session 0x42 on eth2.7)
    br-lan           bridge over lan1p, lan2p
    br-vl            VLAN-filtering bridge (PVID 1) over p1 (VLAN 7 tagged), p2
                     (VLAN 7 untagged); brw.7 = its VLAN 7, brv.1 = its VLAN 1
    tun0             L3 device (no MAC header)
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest

from offloader.errors import ResolveError
from offloader.routing import Resolver, attach_points
from tests.unit.fakes import FakeIPRoute, key, link, sysfs

HOST = "aa:00:00:00:00:02"
GW = "bb:00:00:00:00:01"
AC = "cc:00:00:00:00:01"
VL = {"IFLA_BR_VLAN_FILTERING": 1, "IFLA_BR_VLAN_DEFAULT_PVID": 1}


def vlan(index: int, name: str, lower: int, vid: int, mtu: int = 1500) -> object:
    return link(index, name, kind="vlan", lower=lower, mtu=mtu,
                data={"IFLA_VLAN_ID": vid, "IFLA_VLAN_PROTOCOL": 0x8100})


@pytest.fixture
def router(tmp_path: Path) -> Resolver:
    links = [
        link(2, "eth0"),
        link(3, "eth1"), link(4, "wanm", kind="macvlan", lower=3, mac="02:aa:00:00:00:04"),
        link(5, "eth2"), vlan(6, "eth2.7", 5, 7),
        link(10, "br-lan", kind="bridge"), link(11, "lan1p", master=10, kind="veth"),
        link(12, "lan2p", master=10, kind="veth"),
        link(20, "br-vl", kind="bridge", data=VL), link(21, "p1", master=20),
        link(22, "p2", master=20), vlan(23, "brw.7", 20, 7), vlan(24, "brv.1", 20, 1),
        link(30, "ppp0", kind="ppp", ifi_type=512, mtu=1492),
        link(40, "tun0", kind="tun", ifi_type=0xFFFE, mtu=1420),
    ]
    routes = {"198.51.100.1": (2, "198.19.0.1"), "198.51.100.2": (4, "198.19.1.1"),
              "198.51.100.3": (30, None), "198.18.1.2": (10, None), "198.18.7.2": (23, None),
              "198.18.8.2": (20, None), "198.51.100.4": (6, "198.19.7.1"),
              "198.51.100.5": (40, None)}
    neigh = {(2, "198.19.0.1"): GW, (4, "198.19.1.1"): GW, (10, "198.18.1.2"): HOST,
             (23, "198.18.7.2"): HOST, (20, "198.18.8.2"): HOST, (6, "198.19.7.1"): GW}
    fdb = {(10, HOST): 12, (20, HOST, 7): 21, (20, HOST, 1): 22}
    ipr = FakeIPRoute(links, routes, neigh, fdb, addrs={2, 10, 20},
                      vlans={21: {7: False, 1: True}, 22: {7: True, 1: True}})
    proc = tmp_path / "pppoe"
    proc.write_text("Id       Address              Device\n"
                    f"{socket.htons(0x42):08X} {AC} eth2.7\n")
    return Resolver(ipr, sysfs=tmp_path / "sys", pppoe_proc=proc,  # type: ignore[arg-type]
                    pppoe_run=tmp_path)


def out(res: Resolver, dst: str, *, iif: int = 2, full: bool = True):  # type: ignore[no-untyped-def]
    return res.resolve(key(iif, "198.18.1.9", dst), ipaddress.ip_address(dst), full=full)


def points(res: Resolver, names: list[str], full: bool = True) -> set[tuple[str, int, bool, bool]]:
    return {(p.link.name, p.dsa_proto, p.l3, p.tagged)
            for p in attach_points(res, names, full=full)}


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


# -- plain Ethernet ---------------------------------------------------------------------
def test_ethernet_is_the_bottom(router: Resolver) -> None:
    eg = out(router, "198.51.100.1", iif=11)
    assert (eg.oif, eg.l2.vlans, eg.mtu) == (2, (), 1500)
    assert eg.l2.dmac == mac(GW)
    assert router.ingress(key(2, "198.51.100.1", "198.18.1.9")).l3_iif == 2
    assert points(router, ["eth0"]) == points(router, ["eth0"], full=False) == {
        ("eth0", 0, False, False)}


# -- bridge and bridge port ---------------------------------------------------------------
def test_bridge_down_to_the_fdb_port_in_both_hooks(router: Resolver) -> None:
    for full in (True, False):
        eg = out(router, "198.18.1.2", full=full)
        assert (eg.oif, eg.l2.vlans, eg.l3_oif) == (12, (), 10)


def test_bridge_port_up_to_its_bridge(router: Resolver) -> None:
    assert router.ingress(key(11, "198.18.1.2", "198.51.100.1")).l3_iif == 10


def test_bridge_attaches_to_its_ports(router: Resolver) -> None:
    want = {("lan1p", 0, False, False), ("lan2p", 0, False, False)}
    assert points(router, ["br-lan"]) == points(router, ["br-lan"], full=False) == want


def test_vlan_filtering_bridge_down(router: Resolver) -> None:
    # Its own VLAN (PVID 1) is untagged on p2: no tag written.
    eg = out(router, "198.18.8.2")
    assert (eg.oif, eg.l2.vlans) == (22, ())
    # TC leaves the tagging to the bridge: redirect into the bridge itself.
    assert out(router, "198.18.8.2", full=False).oif == 20


def test_vlan_filtering_bridge_up_by_tag_or_pvid(router: Resolver) -> None:
    assert router.ingress(key(21, "198.18.7.2", "198.51.100.1", vlan_outer=7)).l3_iif == 23
    assert router.ingress(key(22, "198.18.8.2", "198.51.100.1")).l3_iif == 24  # PVID 1
    # No VLAN device for the frame's VLAN: the bridge itself.
    assert router.ingress(key(21, "198.18.8.2", "198.51.100.1", vlan_outer=9)).l3_iif == 20


def test_vlan_filtering_bridge_port_frames_are_tagged(router: Resolver) -> None:
    assert ("p1", 0, False, True) in points(router, ["br-vl"])


# -- VLAN ---------------------------------------------------------------------------------
def test_vlan_down_adds_its_tag_in_xdp_only(router: Resolver) -> None:
    eg = out(router, "198.51.100.4", iif=11)
    assert (eg.oif, eg.l2.vlans, eg.mtu) == (5, ((0x8100, 7),), 1500)
    eg = out(router, "198.51.100.4", iif=11, full=False)
    assert (eg.oif, eg.l2.vlans) == (6, ())


def test_vlan_over_filtering_bridge_goes_to_the_port_for_that_vlan(router: Resolver) -> None:
    eg = out(router, "198.18.7.2")
    assert (eg.oif, eg.l2.vlans, eg.l3_oif) == (21, ((0x8100, 7),), 23)
    assert out(router, "198.18.7.2", full=False).oif == 23  # TC: into brw.7


def test_vlan_up_by_tag(router: Resolver) -> None:
    assert router.ingress(key(5, "198.51.100.4", "198.18.1.9", vlan_outer=7)).l3_iif == 6
    with pytest.raises(ResolveError, match="no VLAN 8 device on eth2"):
        router.ingress(key(5, "198.51.100.4", "198.18.1.9", vlan_outer=8))


def test_vlan_attach(router: Resolver) -> None:
    assert points(router, ["eth2.7"]) == {("eth2", 0, False, True)}  # XDP must see the tag
    assert points(router, ["eth2.7"], full=False) == {("eth2.7", 0, False, False)}


# -- macvlan ----------------------------------------------------------------------------
def test_macvlan_down_keeps_its_own_mac(router: Resolver) -> None:
    eg = out(router, "198.51.100.2", iif=11)
    assert eg.oif == 3 and eg.l2.smac == mac("02:aa:00:00:00:04")
    assert out(router, "198.51.100.2", iif=11, full=False).oif == 4


def test_macvlan_up_only_from_an_unaddressed_lower(router: Resolver) -> None:
    assert router.ingress(key(3, "198.51.100.2", "198.18.1.9")).l3_iif == 4
    router.ipr.addrs.add(3)  # type: ignore[attr-defined]
    router.forget(routes=True)
    assert router.ingress(key(3, "198.51.100.2", "198.18.1.9")).l3_iif == 3


def test_macvlan_attach(router: Resolver) -> None:
    assert points(router, ["wanm"]) == {("eth1", 0, False, False)}
    assert points(router, ["wanm"], full=False) == {("wanm", 0, False, False)}


# -- PPPoE ------------------------------------------------------------------------------
def test_pppoe_down_to_the_session_device(router: Resolver) -> None:
    eg = out(router, "198.51.100.3", iif=11)
    assert (eg.oif, eg.l2.pppoe_sid, eg.l2.vlans) == (5, 0x42, ((0x8100, 7),))
    assert eg.l2.dmac == mac(AC) and eg.mtu == 1492
    assert router.ipr.neigh_queries == []  # type: ignore[attr-defined]  # point to point
    eg = out(router, "198.51.100.3", iif=11, full=False)
    assert (eg.oif, eg.l2.pppoe_sid, eg.mtu) == (30, 0, 1492)


def test_pppoe_up_by_session(router: Resolver) -> None:
    k = key(5, "198.51.100.3", "198.18.1.9", vlan_outer=7, pppoe_sid=0x42)
    assert router.ingress(k).l3_iif == 30
    with pytest.raises(ResolveError, match="PPPoE session 67 on eth2.7"):
        router.ingress(k.replace(pppoe_sid=0x43))


def test_pppoe_attach(router: Resolver) -> None:
    assert points(router, ["ppp0"]) == {("eth2", 0, False, True)}
    assert points(router, ["ppp0"], full=False) == {("ppp0", 0, True, False)}


# -- L3 device --------------------------------------------------------------------------------
def test_l3_device_is_not_offloaded_into(router: Resolver) -> None:
    for full in (True, False):
        with pytest.raises(ResolveError, match="tun0 has no L2 header"):
            out(router, "198.51.100.5", iif=11, full=full)
    assert router.ipr.neigh_queries == []  # type: ignore[attr-defined]  # no neighbour to wait for


def test_l3_device_up_and_attach(router: Resolver) -> None:
    assert router.ingress(key(40, "198.51.100.5", "198.18.1.9")).l3_iif == 40
    assert points(router, ["tun0"]) == points(router, ["tun0"], full=False) == {
        ("tun0", 0, True, False)}


# -- DSA user port ------------------------------------------------------------------------------
@pytest.fixture
def switch(tmp_path: Path) -> Resolver:
    """A conduit eth0 ("qca" tag) with user ports lan1 (port 1, in br-lan) and
    wan (port 5, VLAN wan.7 on top)."""
    ipr = FakeIPRoute([link(2, "eth0", mtu=1502), link(3, "lan1", lower=2, master=10),
                       link(7, "wan", lower=2), vlan(8, "wan.7", 7, 7),
                       link(10, "br-lan", kind="bridge")],
                      {"198.51.100.1": (8, "198.19.0.1"), "198.18.1.2": (10, None)},
                      {(8, "198.19.0.1"): GW, (10, "198.18.1.2"): HOST}, {(10, HOST): 3})
    sysfs(tmp_path / "sys", {"eth0": "qca"}, {"lan1": 1, "wan": 5})
    return Resolver(ipr, sysfs=tmp_path / "sys", pppoe_proc=tmp_path / "none",  # type: ignore[arg-type]
                    pppoe_run=tmp_path)


def test_dsa_down_to_the_conduit_in_xdp_only(switch: Resolver) -> None:
    eg = out(switch, "198.51.100.1", iif=10)
    assert (eg.oif, eg.l2.dsa_proto, eg.l2.dsa_port, eg.l2.vlans) == (2, 2, 5, ((0x8100, 7),))
    eg = out(switch, "198.51.100.1", iif=10, full=False)
    assert (eg.oif, eg.l2.dsa_proto, eg.l2.vlans) == (8, 0, ())  # into wan.7


def test_dsa_up_by_switch_port(switch: Resolver) -> None:
    assert switch.ingress(key(2, "198.18.1.2", "198.51.100.1", dsa_port=1)).l3_iif == 10
    assert switch.ingress(key(2, "198.51.100.1", "198.18.1.2", dsa_port=5,
                              vlan_outer=7)).l3_iif == 8
    with pytest.raises(ResolveError, match="no DSA user port 4 on eth0"):
        switch.ingress(key(2, "198.18.1.2", "198.51.100.1", dsa_port=4))


def test_dsa_attach(switch: Resolver) -> None:
    assert points(switch, ["br-lan", "wan.7"]) == {("eth0", 2, False, False)}
    assert points(switch, ["br-lan", "wan.7"], full=False) == {
        ("lan1", 0, False, False), ("wan.7", 0, False, False)}


def test_the_walk_up_is_cached_until_a_link_or_address_changes(router: Resolver) -> None:
    k = key(3, "198.51.100.2", "198.18.1.9")
    assert router.ingress(k).l3_iif == 4
    router.ipr.addrs.add(3)  # type: ignore[attr-defined]
    assert router.ingress(k).l3_iif == 4  # nothing told the resolver yet
    router.forget(routes=True)  # what an address event does
    assert router.ingress(k).l3_iif == 3
