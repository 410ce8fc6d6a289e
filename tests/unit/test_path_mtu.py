"""The path MTU of an XDP egress through switch tags and VLAN tags.

FAKES, not a real kernel (no DSA driver exists on either kernel here): link
facts from tests/unit/fakes.py. The rule checked: XDP writes the whole frame,
and a redirect (xdp_ok_fwd_dev() in net/core/filter.c) takes at most MTU + 14
+ 4 bytes on the lowest device, so every byte past one VLAN tag's worth costs
a byte of L3 packet. What a switch tag costs follows its kernel tagger:
tag_mtk.c mtk_tag_xmit() pushes 4 bytes on an untagged frame and nothing on
an 802.1Q/802.1ad-tagged one (the tag overwrites the outer TPID);
tag_qca.c qca_tag_xmit() always pushes 2.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from offloader.routing import Resolver
from tests.unit.fakes import FakeIPRoute, key, link, sysfs

GW = "bb:00:00:00:00:01"


def switch(tmp: Path, tag: str, conduit_mtu: int) -> Resolver:
    """Conduit eth0 with ``tag``; user port wan (port 0) carrying wan (plain),
    wan.7 (802.1Q) and wan.100.7 (802.1ad 100 outside, 802.1Q 7 inside)."""
    links = [
        link(2, "eth0", mtu=conduit_mtu), link(7, "wan", lower=2),
        link(8, "wan.7", kind="vlan", lower=7,
             data={"IFLA_VLAN_ID": 7, "IFLA_VLAN_PROTOCOL": 0x8100}),
        link(9, "wan.100", kind="vlan", lower=7,
             data={"IFLA_VLAN_ID": 100, "IFLA_VLAN_PROTOCOL": 0x88A8}),
        link(10, "wan.100.7", kind="vlan", lower=9,
             data={"IFLA_VLAN_ID": 7, "IFLA_VLAN_PROTOCOL": 0x8100}),
        link(20, "lan"),
    ]
    routes = {"198.51.100.1": (7, "198.19.0.1"), "198.51.100.2": (8, "198.19.0.1"),
              "198.51.100.3": (10, "198.19.0.1")}
    neigh = {(i, "198.19.0.1"): GW for i in (7, 8, 10)}
    root = sysfs(tmp / f"sys-{tag}-{conduit_mtu}", {"eth0": tag}, {"wan": 0})
    return Resolver(FakeIPRoute(links, routes, neigh, {}), sysfs=root,  # type: ignore[arg-type]
                    pppoe_proc=tmp / "none", pppoe_run=tmp)


def mtu(res: Resolver, dst: str) -> int:
    eg = res.resolve(key(20, "198.18.1.2", dst), ipaddress.ip_address(dst))
    assert eg.oif == 2 and eg.l2.dsa_port == 0
    return eg.mtu


# (tag, conduit MTU): path MTU untagged, with one tag, with two tags
CASES = [
    # The DSA core raised the conduit's MTU by the tag (the usual case).
    ("mtk", 1504, (1500, 1500, 1500)),
    ("qca", 1502, (1500, 1500, 1496)),
    # A conduit left at 1500 (its driver refused a larger MTU).
    ("mtk", 1500, (1500, 1500, 1496)),
    ("qca", 1500, (1500, 1498, 1494)),
]


@pytest.mark.parametrize("tag,conduit_mtu,want", CASES,
                         ids=[f"{t}-{m}" for t, m, _ in CASES])
def test_xdp_path_mtu_through_switch_and_vlan_tags(tmp_path: Path, tag: str, conduit_mtu: int,
                                                   want: tuple[int, int, int]) -> None:
    res = switch(tmp_path, tag, conduit_mtu)
    got = (mtu(res, "198.51.100.1"), mtu(res, "198.51.100.2"), mtu(res, "198.51.100.3"))
    assert got == want


def test_mtk_tagged_frame_pays_nothing_for_the_switch_tag(tmp_path: Path) -> None:
    """tag_mtk.c: on a tagged frame the special tag replaces the TPID, so a
    full-size packet fits a conduit at MTU 1500 with one VLAN tag. Were the
    4-byte tag pushed in front of the VLAN header (what the datapath used to
    write), the frame would be 1526 bytes and the MTU 1496."""
    res = switch(tmp_path, "mtk", 1500)
    eg = res.resolve(key(20, "198.18.1.2", "198.51.100.2"), ipaddress.ip_address("198.51.100.2"))
    assert eg.l2.vlans == ((0x8100, 7),) and eg.l2.dsa_proto == 1
    assert eg.mtu == 1500
    # Untagged, the 4-byte tag is pushed and still fits the one-tag allowance.
    assert mtu(res, "198.51.100.1") == 1500


def test_tc_path_mtu_is_the_upper_devices(tmp_path: Path) -> None:
    """TC redirects into the VLAN device; the kernel tags and checks."""
    res = switch(tmp_path, "qca", 1500)
    eg = res.resolve(key(20, "198.18.1.2", "198.51.100.3"), ipaddress.ip_address("198.51.100.3"),
                     full=False)
    assert (eg.oif, eg.mtu) == (10, 1500)
