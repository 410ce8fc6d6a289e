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
def test_dsa_tag_before_vlan(rig: Rig, hook: str, egress: model.Encap) -> None:
    """mtk's first byte names the TPID of the tag that follows; ports past the
    bitmap's width give an empty bitmap."""
    key = model.flow_key(ENCAPS["none"], 4, "udp")
    rig.offload(key, model.make_verdict(key, egress, "snat_port"))
    want, got = rig.check(hook, _frame("none", 4, "udp"))
    assert want.action == model.REDIRECT
    assert model.checksum_problems(got.frame, want.l3_off) == []
