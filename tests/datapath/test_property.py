"""Random frames (good and mangled) against random verdicts: the datapath and
the model never disagree, on either hook, with or without GSO."""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop
from scapy.packet import Packet

from offloader.datapath import FlowKey, L2Header, Verdict

from . import model
from .model import TC, XDP
from .rig import Rig, refused, run_or_einval

EXAMPLES = int(os.environ.get("OFL_HYPOTHESIS_EXAMPLES", "300"))
TPIDS = st.sampled_from([model.ETH_P_8021Q, model.ETH_P_8021AD])
U16 = st.integers(0, 0xFFFF)


def mostly(good: object, *others: object, weight: int = 12,
           sane: bool = False) -> st.SearchStrategy[object]:
    """``good`` most of the time (always when ``sane``), so that enough frames
    reach the rewrite."""
    return st.just(good) if sane else st.sampled_from([good] * weight + list(others))


@dataclass
class Case:
    frame: bytes
    intended: bytes  # the frame before mangling: its tuple is the one offloaded
    dsa_proto: int  # of the ingress device
    hook: str
    gso_size: int
    gso_segs: int
    install: str  # "offload", "pass" or "none"
    egress: L2Header
    mtu: int
    nat: dict[str, object]
    checksums_valid: bool  # input checksums right and frame not mangled


def _ip_of(family: int) -> st.SearchStrategy[str]:
    if family == 4:
        return st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
    return st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))


@st.composite
def dsa_tags(draw: st.DrawFn, proto: int, sane: bool) -> bytes:
    if proto == model.DSA_MTK:
        return draw(st.binary(min_size=4, max_size=4))
    if proto == model.DSA_GSWIP:
        return draw(st.binary(min_size=8, max_size=8))
    if proto == model.DSA_QCA:
        good = 0x8000 | draw(st.integers(0, 7)) << 11 | draw(st.integers(0, 7)) << 3 \
            | draw(st.integers(0, 7))
        tag: int = draw(mostly(good, draw(U16), weight=4, sane=sane))  # type: ignore[assignment]
        return tag.to_bytes(2, "big")
    return b""


@st.composite
def l3_packets(draw: st.DrawFn, family: int, sane: bool) -> tuple[bytes, bool]:
    """An L3 packet and whether its checksums are right."""
    src, dst = draw(_ip_of(family)), draw(_ip_of(family))
    ttl = draw(st.integers(2, 255) if sane else st.one_of(st.integers(2, 255), st.integers(0, 3)))
    ip: Packet
    if family == 4:
        ip = IP(src=src, dst=dst, ttl=ttl, tos=draw(st.integers(0, 255)), id=draw(U16),
                flags=draw(st.sampled_from([0] * 8 + [2] * 8 + [1])),  # 1: MF
                frag=draw(mostly(0, 1, 185, weight=30, sane=sane)))
        if draw(mostly(False, True, weight=20, sane=sane)):
            ip.options = [b"\x01\x01\x01\x00"]
    else:
        ip = IPv6(src=src, dst=dst, hlim=ttl, tc=draw(st.integers(0, 255)),
                  fl=draw(st.integers(0, 0xFFFFF)))
        if draw(mostly(False, True, weight=20, sane=sane)):
            ip = ip / IPv6ExtHdrHopByHop()
    kind = draw(st.sampled_from(["tcp", "udp"] if sane else ["tcp"] * 10 + ["udp"] * 10
                                + ["other"]))
    payload = draw(st.binary(max_size=64))
    sport, dport = draw(U16), draw(U16)
    valid = True
    if kind == "tcp":
        flags = draw(mostly(0x10, 0x18, 0x11, 0x12, 0x04, 0x02, draw(st.integers(0, 255)),
                            weight=8, sane=sane))
        seg = TCP(sport=sport, dport=dport, flags=flags, seq=draw(st.integers(0, 2**32 - 1)),
                  window=draw(U16))
        if draw(st.booleans()):
            seg.options = [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]
        if draw(st.integers(0, 4)) == 0:
            seg.chksum, valid = draw(U16), False
    elif kind == "udp":
        seg = UDP(sport=sport, dport=dport)
        choice = draw(st.integers(0, 5))
        if choice == 0:
            seg.chksum = 0  # "none" over IPv4; over IPv6 a broken packet the datapath keeps so
            valid = family == 4
        elif choice == 1:
            seg.chksum, valid = draw(U16), False
    else:
        seg = draw(st.sampled_from([b"\x08\x00\xf7\xff\0\0\0\0", b"\x80\0\0\0"]))
    return bytes(ip / seg / payload), valid and kind != "other"


@st.composite
def cases(draw: st.DrawFn, sane: bool = False) -> Case:
    family = draw(st.sampled_from([4, 6]))
    l3, valid = draw(l3_packets(family, sane))
    frame_dsa = draw(st.sampled_from([0] * 6 + [model.DSA_MTK, model.DSA_QCA, model.DSA_GSWIP]))
    macs, tag = draw(st.binary(min_size=12, max_size=12)), draw(dsa_tags(frame_dsa, sane))
    l2 = tag + macs if frame_dsa == model.DSA_GSWIP else macs + tag
    for _ in range(draw(st.sampled_from([0, 1, 2] if sane else [0] * 4 + [1] * 4 + [2] * 4 + [3]))):
        l2 += draw(TPIDS).to_bytes(2, "big") + draw(U16).to_bytes(2, "big")
    if draw(st.integers(0, 4)) == 0:
        ppp = model.PPP_IP if family == 4 else model.PPP_IPV6
        ppp = draw(mostly(ppp, model.PPP_IP, model.PPP_IPV6, 0xC021, sane=sane))
        head = bytes([draw(mostly(0x11, 0x12, sane=sane)), draw(mostly(0, 9, sane=sane))])
        length = draw(mostly(len(l3) + 2, draw(U16), weight=2, sane=sane))
        l2 += (model.ETH_P_PPP_SES.to_bytes(2, "big") + head + draw(U16).to_bytes(2, "big")
               + length.to_bytes(2, "big") + ppp.to_bytes(2, "big"))
    else:
        etype = model.ETH_P_IP if family == 4 else model.ETH_P_IPV6
        etype = draw(mostly(etype, model.ETH_P_IP, model.ETH_P_IPV6, 0x0806, sane=sane))  # type: ignore[assignment]
        l2 += etype.to_bytes(2, "big")
    frame = intended = l2 + l3 + draw(st.sampled_from([b"", b"", draw(st.binary(max_size=24))]))

    mangle = draw(mostly("none", "truncate", "flip", "length", weight=9, sane=sane))
    if mangle == "truncate":
        frame = frame[: draw(st.integers(0, len(frame)))]
    elif mangle == "flip":
        at = draw(st.integers(0, len(frame) - 1))
        frame = frame[:at] + bytes([frame[at] ^ draw(st.integers(1, 255))]) + frame[at + 1 :]
    elif mangle == "length":
        at = len(l2) + (2 if family == 4 else 4)
        frame = frame[:at] + draw(U16).to_bytes(2, "big") + frame[at + 2 :]

    egress_vlans = tuple((draw(st.sampled_from([0x8100, 0x88A8, 0x9100])), draw(U16))
                         for _ in range(draw(st.sampled_from([0, 0, 1, 2]))))
    egress = L2Header(
        dmac=draw(st.binary(min_size=6, max_size=6)), smac=draw(st.binary(min_size=6, max_size=6)),
        vlans=egress_vlans, pppoe_sid=draw(st.sampled_from([0, 0, draw(st.integers(1, 0xFFFF))])),
        dsa_proto=draw(st.sampled_from([0, 0, 0, model.DSA_MTK, model.DSA_QCA,
                                        model.DSA_GSWIP])),
        dsa_port=draw(st.integers(0, 7)),
    )
    nat: dict[str, object] = {}
    if draw(st.booleans()):
        nat["nat_src"] = ipaddress.ip_address(draw(_ip_of(family)))
    if draw(st.booleans()):
        nat["nat_dst"] = ipaddress.ip_address(draw(_ip_of(family)))
    if draw(st.booleans()):
        nat["nat_sport"] = draw(U16)
    if draw(st.booleans()):
        nat["nat_dport"] = draw(U16)
    hook = draw(st.sampled_from([XDP, TC]))
    gso_size = gso_segs = 0
    if hook == TC and draw(st.integers(0, 3)) == 0:
        gso_size, gso_segs = draw(st.integers(1, 2000)), draw(st.integers(1, 64))
    return Case(
        frame=frame, intended=intended,
        dsa_proto=draw(mostly(frame_dsa, *model.DSA_PROTOS.values(), weight=20,  # type: ignore[arg-type]
                              sane=sane)),
        hook=hook, gso_size=gso_size, gso_segs=gso_segs,
        install=draw(mostly("offload", "pass", "none", weight=8, sane=sane)),  # type: ignore[arg-type]
        egress=egress,
        mtu=draw(mostly(1500, draw(st.integers(len(l3) - 8, len(l3) + 8)), draw(U16),
                        weight=4, sane=sane)),  # type: ignore[arg-type]
        nat=nat, checksums_valid=valid and mangle == "none",
    )


def _key_of(frame: bytes, dsa_proto: int) -> FlowKey | None:
    """The tuple the frame would have had before mangling, if any."""
    try:
        return model.parse(frame, dsa_proto).key(1)
    except model.Unparsed:
        return None


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_never_differs_from_model(loaded: Rig, case: Case) -> None:
    """Good and mangled frames: mostly passes, each for the model's reason."""
    _check(loaded, case)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(sane=True))
def test_good_frames_random_verdicts(loaded: Rig, case: Case) -> None:
    """Well-formed frames of offloaded flows: mostly rewrites, any encapsulation
    in and out, any NAT, any MTU, with checksums that keep verifying."""
    _check(loaded, case)


def _check(rig: Rig, case: Case) -> None:
    rig.reset(dsa_proto=case.dsa_proto)
    key = _key_of(case.intended, case.dsa_proto)
    if key is not None and case.install == "offload":
        nat = {k: v for k, v in case.nat.items()
               if not isinstance(v, ipaddress.IPv4Address | ipaddress.IPv6Address)
               or v.version == (4 if key.family == socket.AF_INET else 6)}
        rig.offload(key, Verdict(oif=1, l2=case.egress, mtu=max(case.mtu, 0) & 0xFFFF, key=key,
                                 **nat))  # type: ignore[arg-type]
    elif key is not None and case.install == "pass":
        rig.mark_pass(key)
    if refused(case.hook, case.frame):
        event("refused by test_run")
        assert run_or_einval(rig, case.hook, case.frame) is None
        return
    want, got = rig.check(case.hook, case.frame, gso_size=case.gso_size,
                          gso_segs=case.gso_segs, parse_counters_as_one=True)
    event(f"{case.hook}: {want.stat} {want.why}")  # pytest --hypothesis-show-statistics
    if want.action == model.REDIRECT and case.checksums_valid:
        assert model.checksum_problems(got.frame, want.l3_off) == []
