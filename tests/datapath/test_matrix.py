"""Every ingress x egress encapsulation, IPv4/IPv6, TCP/UDP/UDP without
checksum, and every NAT kind, through both hooks: the return code and the
output frame equal the model's, byte for byte, and every checksum of the
output verifies."""

from __future__ import annotations

import itertools

import pytest

from . import model
from .model import ENCAPS, NATS, TC, XDP
from .rig import Rig

L4S = {4: ("tcp", "udp", "udp0"), 6: ("tcp", "udp")}
CASES = [
    (ingress, egress, family, l4, nat)
    for ingress, egress in itertools.product(ENCAPS, ENCAPS)
    for family in (4, 6)
    for l4 in L4S[family]
    for nat in NATS
]


def _id(case: tuple[str, str, int, str, str]) -> str:
    ingress, egress, family, l4, nat = case
    return f"{ingress}>{egress}-ip{family}-{l4}-{nat}"


def _frame(ingress: str, family: int, l4: str) -> bytes:
    return model.build_frame(ENCAPS[ingress], model.l3_packet(family, l4))


@pytest.mark.parametrize("hook", [XDP, TC])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_rewrite_matches_model(rig: Rig, hook: str,
                               case: tuple[str, str, int, str, str]) -> None:
    ingress, egress, family, l4, nat = case
    rig.set_dsa(ENCAPS[ingress].dsa_proto)
    key = model.flow_key(ENCAPS[ingress], family, l4)
    rig.offload(key, model.make_verdict(key, ENCAPS[egress], nat))
    frame = _frame(ingress, family, l4)

    want, got = rig.check(hook, frame)

    tc_declines = hook == TC and (ENCAPS[ingress].pppoe_sid or ENCAPS[ingress].dsa_proto)
    assert want.action == (model.PASS if tc_declines else model.REDIRECT)
    if want.action == model.REDIRECT:
        assert model.checksum_problems(got.frame, want.l3_off) == []
        if l4 == "udp0":
            udp_check = got.frame[want.l3_off + 20 + 6 : want.l3_off + 20 + 8]
            assert udp_check == b"\0\0", "a UDP checksum of 0 over IPv4 must stay 0"
        [entry] = list(rig.dp.flow_entries())
        assert entry.packets == 1
        assert entry.nbytes == len(frame) - model.parse(frame, rig.world.dsa_proto).l3_off


@pytest.mark.parametrize("case", [c for c in CASES
                                  if not (ENCAPS[c[0]].pppoe_sid or ENCAPS[c[0]].dsa_proto)],
                         ids=_id)
def test_tc_equals_xdp(rig: Rig, case: tuple[str, str, int, str, str]) -> None:
    """Where TC rewrites at all, it writes exactly what XDP writes."""
    ingress, egress, family, l4, nat = case
    key = model.flow_key(ENCAPS[ingress], family, l4)
    rig.offload(key, model.make_verdict(key, ENCAPS[egress], nat))
    frame = _frame(ingress, family, l4)
    xdp = rig.run(XDP, frame)
    tc = rig.run(TC, frame)
    assert (xdp.retval, tc.retval) == (4, 7)
    assert tc.frame == xdp.frame


DSA_VLAN_EGRESS = [
    model.Encap("mtk_dot1q", vlans=((model.ETH_P_8021Q, 5),), dsa_proto=model.DSA_MTK,
                dsa_port=1),
    model.Encap("mtk_dot1ad", vlans=((model.ETH_P_8021AD, 5), (model.ETH_P_8021Q, 6)),
                dsa_proto=model.DSA_MTK, dsa_port=6),
    model.Encap("mtk_pppoe", vlans=((model.ETH_P_8021Q, 5),), pppoe_sid=9,
                dsa_proto=model.DSA_MTK, dsa_port=0),
    model.Encap("qca_dot1q", vlans=((model.ETH_P_8021Q, 0xE00F),), dsa_proto=model.DSA_QCA,
                dsa_port=7),
    model.Encap("gswip_qinq", vlans=((model.ETH_P_8021AD, 5), (model.ETH_P_8021Q, 6)),
                dsa_proto=model.DSA_GSWIP, dsa_port=6),
    model.Encap("gswip_pppoe", vlans=((model.ETH_P_8021Q, 5),), pppoe_sid=9,
                dsa_proto=model.DSA_GSWIP, dsa_port=1),
]


@pytest.mark.parametrize("hook", [XDP, TC])
@pytest.mark.parametrize("egress", DSA_VLAN_EGRESS, ids=lambda e: e.name)
def test_dsa_tag_with_vlan_egress(rig: Rig, hook: str, egress: model.Encap) -> None:
    """A switch tag on a tagged egress frame, against the model; ports past
    the bitmap's width give an empty bitmap."""
    key = model.flow_key(ENCAPS["none"], 4, "udp")
    rig.offload(key, model.make_verdict(key, egress, "snat_port"))
    want, got = rig.check(hook, _frame("none", 4, "udp"))
    assert want.action == model.REDIRECT
    assert model.checksum_problems(got.frame, want.l3_off) == []


MACS = (model.DMAC_OUT + model.SMAC_OUT).hex()
# Egress headers after the MACs, byte for byte as net/dsa/tag_mtk.c
# mtk_tag_xmit() builds them: on a frame already tagged 802.1Q (kind 1) or
# 802.1ad (kind 2) nothing is pushed, the outer TPID becomes (kind, port
# bitmap) and the outer TCI stays; other frames get 00 <bitmap> 00 00 pushed.
# No kernel here has a DSA driver: these bytes are read from the tagger's code.
MTK_TAGGED_WIRE = {
    "mtk_dot1q_port1": (
        model.Encap("x", vlans=((model.ETH_P_8021Q, 0x2005),), dsa_proto=model.DSA_MTK,
                    dsa_port=1),
        "01 02 2005 0800"),
    "mtk_qinq_port4": (
        model.Encap("x", vlans=((model.ETH_P_8021AD, 100), (model.ETH_P_8021Q, 7)),
                    dsa_proto=model.DSA_MTK, dsa_port=4),
        "02 10 0064 8100 0007 0800"),
    "mtk_vlan_pppoe_port0": (
        model.Encap("x", vlans=((model.ETH_P_8021Q, 7),), pppoe_sid=0x0042,
                    dsa_proto=model.DSA_MTK, dsa_port=0),
        "01 01 0007 8864 1100 0042 {plen} 0021"),
    "mtk_tpid_9100_is_untagged": (
        model.Encap("x", vlans=((0x9100, 9),), dsa_proto=model.DSA_MTK, dsa_port=2),
        "00 04 0000 9100 0009 0800"),
    "mtk_untagged_port3": (ENCAPS["mtk"], "00 08 0000 0800"),
}


@pytest.mark.parametrize("hook", [XDP, TC])
@pytest.mark.parametrize("name", MTK_TAGGED_WIRE)
def test_mtk_tag_on_the_wire(rig: Rig, hook: str, name: str) -> None:
    egress, wire = MTK_TAGGED_WIRE[name]
    key = model.flow_key(ENCAPS["none"], 4, "udp")
    rig.offload(key, model.make_verdict(key, egress))
    l3 = model.l3_packet(4, "udp")
    want, got = rig.check(hook, _frame("none", 4, "udp"))
    header = bytes.fromhex(MACS + wire.format(plen=f"{len(l3) + 2:04x}").replace(" ", ""))
    assert want.action == model.REDIRECT
    assert got.frame[: len(header)] == header
    assert want.l3_off == len(header)


# Lantiq GSWIP, byte for byte as net/dsa/tag_gswip.c builds and reads it (no
# kernel here has a DSA driver; the bytes are taken from the tagger's code).
# gswip_tag_xmit() pushes 4 bytes in front of the destination MAC, tagged
# frame or not: 02 (source: CPU) 00 (destination group ELAN) c0 (port map
# enable | select) and the port bitmap in bits 6:1 of byte 3 with bit 0 set.
# gswip_tag_rcv() strips 8 bytes in front of the destination MAC and takes
# the source port from bits 6:4 of byte 7.
GSWIP_WIRE = {
    "gswip_port0": (model.Encap("x", dsa_proto=model.DSA_GSWIP, dsa_port=0),
                    "0200c003" + MACS + "0800"),
    "gswip_port4_dot1q": (model.Encap("x", vlans=((model.ETH_P_8021Q, 7),),
                                      dsa_proto=model.DSA_GSWIP, dsa_port=4),
                          "0200c021" + MACS + "81000007 0800"),
    "gswip_port6_beyond_the_map": (model.Encap("x", dsa_proto=model.DSA_GSWIP, dsa_port=6),
                                   "0200c001" + MACS + "0800"),
}


@pytest.mark.parametrize("hook", [XDP, TC])
@pytest.mark.parametrize("name", GSWIP_WIRE)
def test_gswip_tag_on_the_wire(rig: Rig, hook: str, name: str) -> None:
    egress, wire = GSWIP_WIRE[name]
    key = model.flow_key(ENCAPS["none"], 4, "udp")
    rig.offload(key, model.make_verdict(key, egress))
    want, got = rig.check(hook, _frame("none", 4, "udp"))
    header = bytes.fromhex(wire.replace(" ", ""))
    assert want.action == model.REDIRECT
    assert got.frame[: len(header)] == header and want.l3_off == len(header)


def test_gswip_ingress_header_is_stripped_and_its_port_keyed(rig: Rig) -> None:
    """An 8-byte gswip header with source port 5 in byte 7 (0x50), then
    dmac smac 0800 IPv4: keyed on port 5 and forwarded without the header."""
    rig.set_dsa(model.DSA_GSWIP)
    l3 = model.l3_packet(4, "udp")
    frame = bytes.fromhex("00000000000000 50") + bytes.fromhex(MACS) + b"\x08\x00" + l3
    key = model.flow_key(model.Encap("p5", dsa_proto=model.DSA_GSWIP, dsa_port=5), 4, "udp")
    assert key.dsa_port == 5
    rig.offload(key, model.make_verdict(key, ENCAPS["none"]))
    want, got = rig.check(XDP, frame)
    assert want.action == model.REDIRECT
    assert got.frame[12:14] == b"\x08\x00" and got.frame[14:] != l3  # TTL, checksum changed
    assert len(got.frame) == len(frame) - 8
