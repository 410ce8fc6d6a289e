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
