"""Frames the datapath must hand to the kernel unchanged, each with the
counter that says why; and the few TC-only rules (PPPoE/DSA ingress, GSO).

Every test installs an offloaded flow for the frame's tuple first, so a pass
proves the rule and not a flow-map miss."""

from __future__ import annotations

import socket

import pytest
from scapy.layers.inet import ICMP, IP, UDP, IPOption
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrHopByHop

from offloader import csum

from . import model
from .model import ENCAPS, PASS, REDIRECT, TC, XDP, Encap
from .rig import Rig, refused, run_or_einval

HOOKS = pytest.mark.parametrize("hook", [XDP, TC])
V4 = [str(a) for a in model.ADDRS[4]]
V6 = [str(a) for a in model.ADDRS[6]]


def offloaded(rig: Rig, encap: Encap = ENCAPS["none"], family: int = 4, l4: str = "udp",
              egress: Encap = ENCAPS["none"], nat: str = "none", mtu: int = 1500) -> None:
    rig.set_dsa(encap.dsa_proto)
    key = model.flow_key(encap, family, l4)
    rig.offload(key, model.make_verdict(key, egress, nat, mtu=mtu))


def assert_passed(rig: Rig, hook: str, frame: bytes, stat: str | None) -> None:
    want, got = rig.check(hook, frame)  # counters checked against the model there
    assert want.action == PASS and want.stat == stat, want.why
    assert got.frame == frame


# -- the slow path for undecided and refused flows -----------------------------
@HOOKS
def test_new_tuple_goes_pending_and_is_announced(rig: Rig, hook: str) -> None:
    frame = model.build_frame(ENCAPS["dot1q"], model.l3_packet(4, "tcp"))
    key = model.flow_key(ENCAPS["dot1q"], 4, "tcp")
    assert_passed(rig, hook, frame, "new")
    assert rig.take_events() == [key]
    [(pkey, first_seen, packets, nbytes)] = list(rig.dp.pending_entries())
    assert (pkey, packets, nbytes) == (key, 1, len(frame) - 18)
    assert first_seen > 0
    # Its next packet counts as pending; no second event inside the renotify time.
    assert_passed(rig, hook, frame, "pending")
    assert rig.take_events() == []
    assert [e[2] for e in rig.dp.pending_entries()] == [2]
    assert list(rig.dp.flow_entries()) == [], "a miss must not create a flow entry"


@HOOKS
def test_decided_tuples_leave_the_pending_map_in_one_batch(rig: Rig, hook: str) -> None:
    """Offloaded and passed tuples stay in the pending map until the
    agent's batch delete (Datapath.settle_pending); meanwhile their packets
    meet the flow map first, and every reader of pending tuples settles."""
    tuples = [(4, "udp"), (4, "tcp"), (6, "udp")]
    for family, l4 in tuples:
        assert_passed(rig, hook, model.build_frame(ENCAPS["none"], model.l3_packet(family, l4)),
                      "new")
    keys = [model.flow_key(ENCAPS["none"], f, l4) for f, l4 in tuples]
    rig.dp.offload(keys[0], model.make_verdict(keys[0], ENCAPS["none"], "none"))
    rig.dp.mark_pass(keys[1])
    assert len(rig.dp.pending.all_keys()) == 3  # not yet deleted
    before = rig.dp.stats()
    rig.run(hook, model.build_frame(ENCAPS["none"], model.l3_packet(4, "tcp")))
    moved = {k: v - before[k] for k, v in rig.dp.stats().items() if v != before[k]}
    assert moved == {"rx": 1, "pass_verdict": 1}
    assert [k for k, *_ in rig.dp.pending_entries()] == [keys[2]]
    assert rig.dp.settle_pending() == 0  # nothing left to delete


@HOOKS
def test_flow_decided_pass(rig: Rig, hook: str) -> None:
    rig.mark_pass(model.flow_key(ENCAPS["none"], 4, "udp"))
    assert_passed(rig, hook, model.build_frame(ENCAPS["none"], model.l3_packet(4, "udp")),
                  "pass_verdict")


@HOOKS
@pytest.mark.parametrize(("flags", "seen"), [("S", model.SEEN_SYN), ("SA", model.SEEN_SYN),
                                             ("FA", model.SEEN_FIN), ("R", model.SEEN_RST),
                                             ("RA", model.SEEN_RST),
                                             ("FR", model.SEEN_FIN | model.SEEN_RST)])
def test_tcp_syn_fin_rst_pass_and_mark_the_flow(rig: Rig, hook: str, flags: str,
                                                seen: int) -> None:
    offloaded(rig, l4="tcp")
    frame = model.build_frame(ENCAPS["none"], model.l3_packet(4, "tcp", tcp_flags=flags))
    assert_passed(rig, hook, frame, "pass_tcp_flags")
    [entry] = list(rig.dp.flow_entries())
    assert entry.seen == seen, f"seen bits {entry.seen:#x}, want {seen:#x}"
    assert entry.packets == 0


@HOOKS
@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("ttl", [0, 1])
def test_ttl_at_most_one(rig: Rig, hook: str, family: int, ttl: int) -> None:
    offloaded(rig, family=family)
    frame = model.build_frame(ENCAPS["none"], model.l3_packet(family, "udp", ttl=ttl))
    assert_passed(rig, hook, frame, "pass_ttl")
    [entry] = list(rig.dp.flow_entries())
    assert entry.seen == model.SEEN_KERNEL, "the kernel saw it: conntrack's timeout was reset"


@HOOKS
@pytest.mark.parametrize("family", [4, 6])
def test_ttl_two_forwards_with_one(rig: Rig, hook: str, family: int) -> None:
    offloaded(rig, family=family)
    frame = model.build_frame(ENCAPS["none"], model.l3_packet(family, "udp", ttl=2))
    want, got = rig.check(hook, frame)
    assert want.action == REDIRECT
    assert got.frame[want.l3_off + (8 if family == 4 else 7)] == 1


@HOOKS
@pytest.mark.parametrize("family", [4, 6])
def test_mtu_boundary(rig: Rig, hook: str, family: int) -> None:
    l3 = model.l3_packet(family, "tcp", payload=b"m" * 1000)
    offloaded(rig, family=family, l4="tcp", mtu=len(l3) - 1)
    assert_passed(rig, hook, model.build_frame(ENCAPS["none"], l3), "pass_mtu")
    [entry] = list(rig.dp.flow_entries())
    assert entry.seen == model.SEEN_KERNEL, "the kernel saw it: conntrack's timeout was reset"
    offloaded(rig, family=family, l4="tcp", mtu=len(l3))  # exactly the MTU fits
    want, _ = rig.check(hook, model.build_frame(ENCAPS["none"], l3))
    assert want.action == REDIRECT


# -- last_seen: stamped when a packet is forwarded, not when a hit is passed ----
def _last_seen(rig: Rig) -> int:
    [entry] = list(rig.dp.flow_entries())
    return entry.last_seen_ns


PASSED_HITS = {  # reason: (TTL, TCP flags, MTU less than the packet)
    "pass_ttl": (1, "A", False),
    "pass_tcp_flags": (64, "FA", False),
    "pass_mtu": (64, "A", True),
}


@HOOKS
@pytest.mark.parametrize("why", PASSED_HITS)
def test_a_passed_hit_does_not_stamp_last_seen(rig: Rig, hook: str, why: str) -> None:
    """An offloaded flow whose packets are all passed (TTL, TCP flags, over
    the MTU) must be able to idle out: the agent's sweep removes flows whose
    last_seen is older than the timeout, so a passed hit leaves it alone."""
    ttl, flags, small_mtu = PASSED_HITS[why]
    l3 = model.l3_packet(4, "tcp", ttl=ttl, tcp_flags=flags)
    offloaded(rig, l4="tcp", mtu=len(l3) - 1 if small_mtu else 1500)
    before = _last_seen(rig)
    assert_passed(rig, hook, model.build_frame(ENCAPS["none"], l3), why)
    assert _last_seen(rig) == before


@pytest.mark.parametrize("ingress", ["pppoe", "mtk"])
def test_a_hit_tc_cannot_rewrite_does_not_stamp_last_seen(rig: Rig, ingress: str) -> None:
    offloaded(rig, encap=ENCAPS[ingress])
    before = _last_seen(rig)
    assert_passed(rig, TC, model.build_frame(ENCAPS[ingress], model.l3_packet(4, "udp")),
                  "pass_unsupported")
    assert _last_seen(rig) == before


def test_a_redirect_xdp_cannot_make_does_not_stamp_last_seen(rig: Rig) -> None:
    offloaded(rig)
    rig.dp.tx_ports.delete((1).to_bytes(4, "little"))
    rig.dp.forget_tx_ports()  # as the agent does on the link event that removes it
    before = _last_seen(rig)
    assert rig.run(XDP, model.build_frame(ENCAPS["none"], model.l3_packet(4, "udp"))).retval == 2
    assert _last_seen(rig) == before


@HOOKS
def test_a_forwarded_packet_stamps_last_seen(rig: Rig, hook: str) -> None:
    offloaded(rig)
    before = _last_seen(rig)
    want, _ = rig.check(hook, model.build_frame(ENCAPS["none"], model.l3_packet(4, "udp")))
    assert want.action == REDIRECT
    assert _last_seen(rig) > before


@HOOKS
def test_a_flow_decided_as_pass_is_stamped(rig: Rig, hook: str) -> None:
    """A pass verdict is remembered while the flow's traffic lasts (its
    entry idles out only when the traffic stops)."""
    rig.mark_pass(model.flow_key(ENCAPS["none"], 4, "udp"))
    before = _last_seen(rig)
    assert_passed(rig, hook, model.build_frame(ENCAPS["none"], model.l3_packet(4, "udp")),
                  "pass_verdict")
    assert _last_seen(rig) > before


# -- L3 the datapath leaves to the kernel --------------------------------------
def _v4(**ip: object) -> bytes:
    return bytes(IP(src=V4[0], dst=V4[1], **ip) / UDP(sport=model.SPORT, dport=model.DPORT)
                 / (b"x" * 20))


L3_PASSES = {
    "ipv4-options": _v4(options=IPOption(b"\x01\x01\x01\x00")),
    "ipv4-more-fragments": _v4(flags="MF"),
    "ipv4-fragment-offset": _v4(frag=8),
    "ipv4-icmp": bytes(IP(src=V4[0], dst=V4[1]) / ICMP()),
    "ipv6-hop-by-hop": bytes(IPv6(src=V6[0], dst=V6[1]) / IPv6ExtHdrHopByHop()
                             / UDP(sport=model.SPORT, dport=model.DPORT) / (b"x" * 20)),
    "ipv6-icmp": bytes(IPv6(src=V6[0], dst=V6[1]) / ICMPv6EchoRequest()),
}


@HOOKS
@pytest.mark.parametrize("name", L3_PASSES)
def test_l3_left_to_the_kernel(rig: Rig, hook: str, name: str) -> None:
    """IPv4 options and fragments, IPv6 extension headers, neither TCP nor
    UDP: counted as pass_l3 (offload.h documents OFL_STAT_PASS_L3 for these)."""
    l3 = L3_PASSES[name]
    offloaded(rig, family=l3[0] >> 4)
    assert_passed(rig, hook, model.build_frame(ENCAPS["none"], l3), "pass_l3")


# -- L2 the datapath leaves to the kernel --------------------------------------
@HOOKS
def test_three_vlan_tags(rig: Rig, hook: str) -> None:
    three = Encap("three", vlans=((model.ETH_P_8021AD, 1), (model.ETH_P_8021Q, 2),
                                  (model.ETH_P_8021Q, 3)))
    offloaded(rig, encap=ENCAPS["qinq"])
    assert_passed(rig, hook, model.build_frame(three, model.l3_packet(4, "udp")), "pass_l2")


PPPOE_OFF = 14 + 4  # after the MACs and the one tag of vlan_pppoe


@HOOKS
@pytest.mark.parametrize(("at", "value", "what"), [
    (6, b"\xc0\x21", "LCP"), (6, b"\x80\x21", "IPCP"), (6, b"\x00\x00", "PPP protocol 0"),
    (0, b"\x12", "version 1 type 2"), (1, b"\x09", "discovery code PADI"),
])
def test_pppoe_not_ip_session_data(rig: Rig, hook: str, at: int, value: bytes,
                                   what: str) -> None:
    offloaded(rig, encap=ENCAPS["vlan_pppoe"])
    frame = bytearray(model.build_frame(ENCAPS["vlan_pppoe"], model.l3_packet(4, "udp")))
    frame[PPPOE_OFF + at : PPPOE_OFF + at + len(value)] = value
    assert_passed(rig, hook, bytes(frame), "pass_l2")


@HOOKS
@pytest.mark.parametrize("tag", [0x4002, 0xC002, 0x8042, 0x87C2], ids=hex)
def test_qca_tag_other_version_or_type(rig: Rig, hook: str, tag: int) -> None:
    offloaded(rig, encap=ENCAPS["qca"])
    frame = bytearray(model.build_frame(ENCAPS["qca"], model.l3_packet(4, "udp")))
    frame[12:14] = tag.to_bytes(2, "big")
    assert_passed(rig, hook, bytes(frame), "pass_l2")


@HOOKS
def test_not_ip(rig: Rig, hook: str) -> None:
    offloaded(rig)
    arp = bytes.fromhex("ffffffffffff020000000002" "0806" "0001080006040001") + bytes(20)
    assert_passed(rig, hook, arp, "pass_l2")


# -- truncation and lying length fields ------------------------------------------
TRUNCATED = [(encap, family, l4) for encap in ENCAPS for family in (4, 6) for l4 in ("tcp", "udp")]


@HOOKS
@pytest.mark.parametrize(("encap", "family", "l4"), TRUNCATED,
                         ids=[f"{e}-ip{f}-{p}" for e, f, p in TRUNCATED])
def test_every_truncation(rig: Rig, hook: str, encap: str, family: int, l4: str) -> None:
    """Each prefix of a good frame, 0 bytes up to the end of its L4 header:
    unchanged, pass_l2. Some test_run refuses before the program runs
    (below 14 bytes; for TC an IP ethertype without a whole IP header)."""
    offloaded(rig, encap=ENCAPS[encap], family=family, l4=l4)
    frame = model.build_frame(ENCAPS[encap], model.l3_packet(family, l4))
    p = model.parse(frame, ENCAPS[encap].dsa_proto)
    l4_end = p.l4_off + (20 if l4 == "tcp" else 8)
    for n in range(l4_end):
        cut = frame[:n]
        if refused(hook, cut):
            assert run_or_einval(rig, hook, cut) is None
            continue
        assert_passed(rig, hook, cut, "pass_l2")
    # and the whole frame forwards (XDP always; TC where it rewrites at all)
    want, _ = rig.check(hook, frame)
    assert want.action == REDIRECT or want.stat == "pass_unsupported"


@HOOKS
@pytest.mark.parametrize("family", [4, 6])
def test_l3_length_beyond_the_frame(rig: Rig, hook: str, family: int) -> None:
    offloaded(rig, family=family)
    frame = bytearray(model.build_frame(ENCAPS["none"], model.l3_packet(family, "udp")))
    at = 14 + (2 if family == 4 else 4)
    frame[at : at + 2] = (int.from_bytes(frame[at : at + 2], "big") + 1).to_bytes(2, "big")
    assert_passed(rig, hook, bytes(frame), "pass_l2")


@HOOKS
def test_ethernet_padding_is_kept(rig: Rig, hook: str) -> None:
    """Bytes after the L3 packet (minimum frame padding) travel along untouched."""
    offloaded(rig, l4="udp")
    frame = model.build_frame(ENCAPS["none"], model.l3_packet(4, "udp", payload=b""),
                              trailer=b"\xa5" * 18)
    want, got = rig.check(hook, frame)
    assert want.action == REDIRECT and got.frame.endswith(b"\xa5" * 18)


# -- fail-safe -----------------------------------------------------------------
@HOOKS
def test_stale_heartbeat(rig: Rig, hook: str) -> None:
    offloaded(rig)
    rig.dp.configure(heartbeat_timeout=1.0)  # the rig's 3600 s may exceed the uptime
    rig.dp.heartbeat(now_ns=1)
    rig.world.fresh = False
    assert_passed(rig, hook, model.build_frame(ENCAPS["none"], model.l3_packet(4, "udp")),
                  "pass_stale")


@HOOKS
def test_offload_disabled(rig: Rig, hook: str) -> None:
    offloaded(rig)
    rig.dp.configure(enabled=False, heartbeat_timeout=3600.0)
    rig.world.enabled = False
    assert_passed(rig, hook, model.build_frame(ENCAPS["none"], model.l3_packet(4, "udp")), None)
    assert list(rig.dp.pending_entries()) == []


def test_xdp_output_device_missing_from_devmap(rig: Rig) -> None:
    offloaded(rig)
    rig.dp.tx_ports.delete((1).to_bytes(4, "little"))
    rig.dp.forget_tx_ports()  # as the agent does on the link event that removes it
    frame = model.build_frame(ENCAPS["none"], model.l3_packet(4, "udp"))
    before = rig.dp.stats()
    got = rig.run(XDP, frame)
    assert (got.retval, got.frame) == (2, frame)
    assert rig.dp.stats()["redirect_fail"] == before["redirect_fail"] + 1


# -- checksum corner cases -------------------------------------------------------
def _udp_with_check(check: int) -> bytes:
    l3 = bytearray(model.l3_packet(4, "udp"))
    l3[26:28] = check.to_bytes(2, "big")
    return bytes(l3)


@HOOKS
def test_udp_checksum_that_becomes_zero_is_sent_as_ffff(rig: Rig, hook: str) -> None:
    """A rewritten UDP checksum of 0 would mean "no checksum": it goes out as 0xffff."""
    offloaded(rig, nat="snat_port")
    _, _, d_addr, d_port = model.verdict_deltas(rig.world.flows[
        model.flow_key(ENCAPS["none"], 4, "udp")].verdict)
    delta = csum.add(d_addr, d_port)
    check = next(c for c in range(1, 0x10000) if csum.apply(c, delta) == 0)
    want, got = rig.check(hook, model.build_frame(ENCAPS["none"], _udp_with_check(check)))
    assert want.action == REDIRECT
    assert got.frame[14 + 26 : 14 + 28] == b"\xff\xff"


@HOOKS
def test_tcp_checksum_ffff_with_cancelling_deltas(rig: Rig, hook: str) -> None:
    """SNAT plus a source port chosen so that the address and port deltas sum
    to one's complement zero, on a TCP checksum field of 0xffff: both hooks
    apply the two deltas one after the other with the kernel's arithmetic and
    write the same bytes (here 0x0000, equal to 0xffff in one's complement)."""
    key = model.flow_key(ENCAPS["none"], 4, "tcp")
    nsrc = model.NAT_ADDRS[4][0]
    d_addr = csum.delta(key.src.packed + key.dst.packed, nsrc.packed + key.dst.packed)
    old = model.SPORT.to_bytes(2, "big")
    sport = next(s for s in range(1, 0x10000)
                 if csum.add(d_addr, csum.delta(old, s.to_bytes(2, "big"))) == 0)
    verdict = model.Verdict(oif=1, l2=ENCAPS["none"].l2header(model.DMAC_OUT, model.SMAC_OUT),
                            mtu=1500, key=key, nat_src=nsrc, nat_sport=sport)
    rig.offload(key, verdict)
    l3 = bytearray(model.l3_packet(4, "tcp"))
    l3[36:38] = b"\xff\xff"
    want, got = rig.check(hook, model.build_frame(ENCAPS["none"], bytes(l3)))
    assert want.action == REDIRECT


# -- TC and GSO ------------------------------------------------------------------
GSO_PAYLOAD = 3000  # three 1448-byte segments and a bit


def _gso_frame(encap: Encap = ENCAPS["none"]) -> bytes:
    return model.build_frame(encap, model.l3_packet(4, "tcp", payload=b"g" * GSO_PAYLOAD))


@pytest.mark.parametrize(("gso_size", "action"), [(1448, REDIRECT), (1460, REDIRECT),
                                                  (1461, PASS)])
def test_tc_gso_mtu_is_per_segment(rig: Rig, gso_size: int, action: str) -> None:
    """L3+L4 headers (40) + gso_size <= mtu (1500) forwards a 3040-byte packet."""
    offloaded(rig, l4="tcp", nat="snat_port")
    segs = -(-GSO_PAYLOAD // gso_size)
    want, got = rig.check(TC, _gso_frame(), gso_size=gso_size, gso_segs=segs)
    assert want.action == action
    if action == REDIRECT:
        assert model.checksum_problems(got.frame, want.l3_off) == []
        [entry] = list(rig.dp.flow_entries())
        assert entry.packets == segs, "a GSO packet counts as its segments"
    else:
        assert want.stat == "pass_mtu"


def test_tc_gso_pops_ingress_vlan(rig: Rig) -> None:
    offloaded(rig, encap=ENCAPS["qinq"], l4="tcp", nat="dnat_port")
    want, _ = rig.check(TC, _gso_frame(ENCAPS["qinq"]), gso_size=1448, gso_segs=3)
    assert want.action == REDIRECT


@pytest.mark.parametrize("egress", ["dot1q", "qinq", "pppoe", "vlan_pppoe", "mtk", "qca", "gswip"])
def test_tc_gso_with_egress_encapsulation_passes(rig: Rig, egress: str) -> None:
    offloaded(rig, l4="tcp", egress=ENCAPS[egress])
    want, got = rig.check(TC, _gso_frame(), gso_size=1448, gso_segs=3)
    assert want.stat == "pass_unsupported" and got.frame == _gso_frame()


def test_xdp_has_no_gso_exemption(rig: Rig) -> None:
    """XDP never sees GSO packets: a 3040-byte frame over a 1500 MTU passes."""
    offloaded(rig, l4="tcp")
    assert_passed(rig, XDP, _gso_frame(), "pass_mtu")


@pytest.mark.parametrize("ingress", ["pppoe", "vlan_pppoe", "mtk", "qca", "gswip"])
def test_tc_declines_pppoe_and_dsa_ingress(rig: Rig, ingress: str) -> None:
    offloaded(rig, encap=ENCAPS[ingress])
    frame = model.build_frame(ENCAPS[ingress], model.l3_packet(4, "udp"))
    assert_passed(rig, TC, frame, "pass_unsupported")
    want, _ = rig.check(XDP, frame)
    assert want.action == REDIRECT


def test_key_carries_every_ingress_tag(rig: Rig) -> None:
    """A flow offloaded for one VLAN/PPPoE session/DSA port does not match
    the same 5-tuple arriving with another."""
    offloaded(rig, encap=ENCAPS["vlan_pppoe"])
    other_vlan = Encap("v8", vlans=((model.ETH_P_8021Q, 8),), pppoe_sid=0x0042)
    other_sid = Encap("s43", vlans=((model.ETH_P_8021Q, 7),), pppoe_sid=0x0043)
    for encap in (other_vlan, other_sid, ENCAPS["pppoe"], ENCAPS["dot1q"]):
        want, _ = rig.check(XDP, model.build_frame(encap, model.l3_packet(4, "udp")))
        assert want.stat == "new"
    rig.reset(dsa_proto=model.DSA_MTK)
    offloaded(rig, encap=ENCAPS["mtk"])
    port5 = Encap("mtk5", dsa_proto=model.DSA_MTK, dsa_port=5)
    want, _ = rig.check(XDP, model.build_frame(port5, model.l3_packet(4, "udp")))
    assert want.stat == "new"
    rig.reset(dsa_proto=model.DSA_GSWIP)
    offloaded(rig, encap=ENCAPS["gswip"])
    port2 = Encap("gswip2", dsa_proto=model.DSA_GSWIP, dsa_port=2)
    want, _ = rig.check(XDP, model.build_frame(port2, model.l3_packet(4, "udp")))
    assert want.stat == "new"
    assert socket.AF_INET in {k.family for k in rig.take_events()}


@HOOKS
def test_after_a_fin_the_rest_of_the_direction_goes_to_the_kernel(rig: Rig, hook: str) -> None:
    """The last ACK of a close must reach conntrack (else it ends in LAST_ACK
    instead of TIME_WAIT): once a FIN or RST was seen, the direction passes
    until the sweep removes it. A SYN alone does not close it."""
    offloaded(rig, l4="tcp")
    assert_passed(rig, hook, model.build_frame(ENCAPS["none"], model.l3_packet(
        4, "tcp", tcp_flags="FA")), "pass_tcp_flags")
    assert_passed(rig, hook, model.build_frame(ENCAPS["none"], model.l3_packet(
        4, "tcp", tcp_flags="A")), "pass_tcp_flags")
