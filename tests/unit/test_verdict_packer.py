"""VerdictPacker builds the same ofl_flow bytes as Verdict.pack, from a
template per path, for every kind of NAT, both directions, both families,
tagged and untagged paths, and for many flows sharing one template."""

from __future__ import annotations

import ipaddress
import itertools
import socket

import pytest
from pyroute2.netlink.nfnetlink.nfctsocket import IPS_ASSURED, IPS_CONFIRMED

from offloader.conntrack import CtEntry, Tuple5
from offloader.datapath import FlowKey, L2Header
from offloader.decision import VerdictPacker, verdict_for
from offloader.layout import layout
from offloader.routing import Egress

A = ipaddress.ip_address


def path(vlans: tuple[tuple[int, int], ...] = ()) -> Egress:
    return Egress(oif=5, l2=L2Header(b"\x02\0\0\0\0\x07", b"\x04\0\0\0\0\x09", vlans=vlans),
                  mtu=1492, l3_oif=6, nexthop=A("198.19.0.1"))


CASES = {
    # name: (src, dst, target src, target dst, target sport, target dport) for sport 40000 -> 53
    "none": ("198.18.0.2", "198.19.0.9", "198.18.0.2", "198.19.0.9", 40000, 53),
    "masquerade": ("198.18.0.2", "198.19.0.9", "198.19.0.1", "198.19.0.9", 61000, 53),
    "snat same port": ("198.18.0.2", "198.19.0.9", "198.19.0.1", "198.19.0.9", 40000, 53),
    "dnat": ("198.19.0.9", "198.19.0.1", "198.19.0.9", "198.18.0.5", 40000, 8053),
    "both": ("198.18.0.2", "198.19.0.1", "198.19.0.1", "198.18.0.5", 1, 65535),
    "v6": ("2001:db8::2", "2001:db8:1::9", "2001:db8:1::1", "2001:db8:1::9", 12345, 53),
}


@pytest.mark.parametrize(("name", "reply", "vlans", "status", "zone", "mark"), [
    (n, r, v, s, z, m) for n, r, v, s, z, m in itertools.product(
        CASES, (False, True), ((), ((0x8100, 7),)), (IPS_CONFIRMED, IPS_CONFIRMED | IPS_ASSURED),
        (0, 3), (0, 0x100))])
def test_same_bytes_as_verdict_pack(name: str, reply: bool, vlans: tuple[tuple[int, int], ...],
                                    status: int, zone: int, mark: int) -> None:
    src, dst, tsrc, tdst, tsport, tdport = CASES[name]
    packer = VerdictPacker()
    for sport in (40000, 40001, 1, 65535):  # the second and later from the template
        key = FlowKey(ifindex=3, family=socket.AF_INET6 if ":" in src else socket.AF_INET,
                      proto=socket.IPPROTO_UDP, src=A(src), dst=A(dst), sport=sport, dport=53)
        # The target keeps the case's port rewrite (or none) for each flow.
        target = Tuple5(socket.IPPROTO_UDP, A(tsrc), A(tdst),
                        sport if tsport == 40000 else tsport + sport % 7, tdport)
        entry = CtEntry(Tuple5(17, A(src), A(dst), sport, 53), Tuple5(17, A(dst), A(src), 53, sport),
                        status, -1, zone, False, 30, mark)
        want = verdict_for(key, path(vlans), target, entry, reply).pack(last_seen_ns=123 + sport)
        own = Tuple5(17, key.src, key.dst, key.sport, key.dport)  # the key's own tuple
        assert packer.pack(key.pack(), own, path(vlans), target, entry, reply, 123 + sport) == want


def test_a_template_is_kept_per_path() -> None:
    packer = VerdictPacker()
    src, dst = A("198.18.0.2"), A("198.19.0.9")
    for oif_vlans in ((), ((0x8100, 7),)):
        for sport in range(1000, 1010):
            key = FlowKey(ifindex=3, family=socket.AF_INET, proto=17, src=src, dst=dst,
                          sport=sport, dport=53)
            entry = CtEntry(Tuple5(17, src, dst, sport, 53), Tuple5(17, dst, src, 53, sport),
                            IPS_CONFIRMED, -1, 0, False, 30)
            packer.pack(key.pack(), entry.orig, path(oif_vlans), Tuple5(17, src, dst, sport, 53), entry,
                        False, 0)
    assert len(packer._templates) == 2


def test_flags_are_added_to_one_flow_and_not_to_the_template() -> None:
    """A flow TC must forward (hook auto, a veth egress) gets OFL_V_TC in its
    own value; the template it shares with other flows of its path stays
    without it, so the next flow of that path gets none."""
    lay = layout()
    tc, at = lay.const("OFL_V_TC"), lay.ffi.offsetof("struct ofl_flow", "v", "flags")
    packer = VerdictPacker()
    src, dst = A("198.18.0.2"), A("198.19.0.9")
    values = {}
    for sport, flags in ((1000, tc), (1001, 0)):
        key = FlowKey(ifindex=3, family=socket.AF_INET, proto=17, src=src, dst=dst,
                      sport=sport, dport=53)
        entry = CtEntry(Tuple5(17, src, dst, sport, 53), Tuple5(17, dst, src, 53, sport),
                        IPS_CONFIRMED, -1, 0, False, 30)
        want = verdict_for(key, path(), entry.orig, entry, False).pack(last_seen_ns=7)
        got = packer.pack(key.pack(), entry.orig, path(), entry.orig, entry, False, 7, flags)
        values[sport] = (got, want)
    got, want = values[1000]
    assert got[at] == want[at] | tc and got[:at] + got[at + 1 :] == want[:at] + want[at + 1 :]
    got, want = values[1001]
    assert got == want and not got[at] & tc
