"""A pure-Python reference model of the datapath, written from the spec.

``expect(frame, world, hook)`` says what the XDP or TC program must do with
one frame: the action (pass or redirect), the frame it leaves behind, and the
stats counter that moves. Nothing here reads bpf/offload.bpf.c: the parse
order, the rewrite and the checksum arithmetic follow the spec (BRIEF
section 3 and issue 2), so a disagreement between the two is a finding.

Also here: the encapsulations the tests use (:class:`Encap`), a builder for
ingress frames, and a scapy check that every checksum of a frame verifies.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from dataclasses import dataclass, field

from offloader import csum
from offloader.datapath import DSA_PORT_NONE, DSA_PROTOS, FlowKey, L2Header, Verdict

XDP = "xdp"
TC = "tc"
PASS = "pass"
REDIRECT = "redirect"
RETVAL = {(XDP, PASS): 2, (XDP, REDIRECT): 4, (TC, PASS): 0, (TC, REDIRECT): 7}

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
ETH_P_PPP_SES = 0x8864
PPP_IP = 0x0021
PPP_IPV6 = 0x0057
# Protocol numbers are the header's (the datapath's ofl_ifaces/verdict values);
# the tag bytes below are written from the kernel's taggers, not from the C.
DSA_NONE, DSA_MTK, DSA_QCA, DSA_GSWIP = (DSA_PROTOS[n] for n in ("none", "mtk", "qca", "gswip"))
STATE_OFFLOAD, STATE_PASS = 1, 2
SEEN_FIN, SEEN_RST, SEEN_SYN, SEEN_KERNEL = 1, 2, 4, 8
TCP_FIN, TCP_SYN, TCP_RST = 0x01, 0x02, 0x04


# -- encapsulations -----------------------------------------------------------
@dataclass(frozen=True)
class Encap:
    """What sits between the source MAC and L3: [DSA tag] [VLAN tags] [PPPoE]."""

    name: str = "none"
    vlans: tuple[tuple[int, int], ...] = ()  # (TPID, TCI), outermost first
    pppoe_sid: int = 0
    dsa_proto: int = DSA_NONE
    dsa_port: int = 0

    def key_fields(self) -> dict[str, int]:
        """The flow key fields a frame with this encapsulation has on ingress."""
        vids = [tci & 0xFFF for _, tci in self.vlans] + [0, 0]
        return {
            "vlan_outer": vids[0],
            "vlan_inner": vids[1],
            "pppoe_sid": self.pppoe_sid,
            "dsa_port": self.dsa_port & 7 if self.dsa_proto else DSA_PORT_NONE,
        }

    def l2header(self, dmac: bytes, smac: bytes) -> L2Header:
        """This encapsulation as a verdict's egress header."""
        return L2Header(dmac=dmac, smac=smac, vlans=self.vlans, pppoe_sid=self.pppoe_sid,
                        dsa_proto=self.dsa_proto, dsa_port=self.dsa_port)


ENCAPS: dict[str, Encap] = {
    e.name: e
    for e in (
        Encap("none"),
        Encap("dot1q", vlans=((ETH_P_8021Q, 0x2000 | 10),)),  # PCP 1: the TCI is written raw
        Encap("qinq", vlans=((ETH_P_8021AD, 100), (ETH_P_8021Q, 10))),
        Encap("pppoe", pppoe_sid=0x1234),
        Encap("vlan_pppoe", vlans=((ETH_P_8021Q, 7),), pppoe_sid=0x0042),
        Encap("mtk", dsa_proto=DSA_MTK, dsa_port=3),
        Encap("qca", dsa_proto=DSA_QCA, dsa_port=2),
        Encap("gswip", dsa_proto=DSA_GSWIP, dsa_port=4),
    )
}


def ingress_dsa_tag(encap: Encap) -> bytes:
    """The tag a switch puts on a frame it sends to the CPU port (gswip's
    goes before the destination MAC, the others' after the source MAC)."""
    if encap.dsa_proto == DSA_GSWIP:
        return bytes(7) + bytes([(encap.dsa_port & 7) << 4])  # tag_gswip.c rcv: byte 7, bits 6:4
    if encap.dsa_proto == DSA_MTK:
        return bytes([0x00, encap.dsa_port & 7, 0x00, 0x00])  # tag_mtk.c rcv: port in bits 2:0
    if encap.dsa_proto == DSA_QCA:
        hdr = (2 << 14) | (encap.dsa_port & 7)  # version 2, type 0 (normal frame)
        return hdr.to_bytes(2, "big")
    return b""


def pppoe_header(sid: int, l3_len: int, family: int) -> bytes:
    ppp = PPP_IP if family == 4 else PPP_IPV6
    return (bytes([0x11, 0x00]) + sid.to_bytes(2, "big") + (l3_len + 2).to_bytes(2, "big")
            + ppp.to_bytes(2, "big"))


def _tags_and_type(encap: Encap, l3: bytes) -> bytes:
    family = l3[0] >> 4 if l3 else 4
    out = b""
    for tpid, tci in encap.vlans:
        out += tpid.to_bytes(2, "big") + tci.to_bytes(2, "big")
    if encap.pppoe_sid:
        session = pppoe_header(encap.pppoe_sid, len(l3), family)
        return out + ETH_P_PPP_SES.to_bytes(2, "big") + session
    return out + (ETH_P_IP if family == 4 else ETH_P_IPV6).to_bytes(2, "big")


def build_frame(encap: Encap, l3: bytes, *, dmac: bytes = b"\x02\0\0\0\0\x01",
                smac: bytes = b"\x02\0\0\0\0\x02", trailer: bytes = b"") -> bytes:
    """An ingress frame: MACs, the encapsulation, the L3 packet, any trailer."""
    tag = ingress_dsa_tag(encap)
    if encap.dsa_proto == DSA_GSWIP:
        return tag + dmac + smac + _tags_and_type(encap, l3) + l3 + trailer
    return dmac + smac + tag + _tags_and_type(encap, l3) + l3 + trailer


MTK_TAGGED_KIND = {ETH_P_8021Q: 1, ETH_P_8021AD: 2}  # tag_mtk.c MTK_HDR_XMIT_TAGGED_TPID_*


def egress_l2(l2: L2Header, family: int, l3_len: int) -> bytes:
    """The L2 header a verdict writes: dmac smac [DSA] [tag0] [tag1] type|PPPoE."""
    out = l2.dmac + l2.smac
    port = l2.dsa_port & 7
    tags = b"".join(tpid.to_bytes(2, "big") + tci.to_bytes(2, "big") for tpid, tci in l2.vlans)
    if l2.dsa_proto == DSA_MTK:
        # mtk_tag_xmit(): a frame whose protocol is 802.1Q or 802.1ad keeps its
        # length; the outer TPID's two bytes become (kind, port bitmap) and the
        # outer TCI stays. Any other frame gets (0, bitmap, 0, 0) pushed.
        kind = MTK_TAGGED_KIND.get(l2.vlans[0][0]) if l2.vlans else None
        bitmap = (1 << port) & 0x3F
        if kind is None:
            out += bytes([0, bitmap, 0, 0])
        else:
            tags = bytes([kind, bitmap]) + tags[2:]
    elif l2.dsa_proto == DSA_QCA:
        # qca_tag_xmit(): version 2 (bits 15:14), from CPU (bit 7), port bitmap
        out += (0x8000 | 0x80 | ((1 << port) & 0x7F)).to_bytes(2, "big")
    elif l2.dsa_proto == DSA_GSWIP:
        # gswip_tag_xmit(): 4 bytes before the destination MAC: source port
        # CPU (2), destination group ELAN (0), port map enable and select,
        # the port bitmap in bits 6:1 of byte 3 with DPID enable (bit 0)
        out = bytes([2, 0, 0xC0, (((1 << port) << 1) & 0x7E) | 1]) + out
    out += tags
    if l2.pppoe_sid:
        out += ETH_P_PPP_SES.to_bytes(2, "big") + pppoe_header(l2.pppoe_sid, l3_len, family)
    else:
        out += (ETH_P_IP if family == 4 else ETH_P_IPV6).to_bytes(2, "big")
    return out


# -- parsing ------------------------------------------------------------------
@dataclass
class Parsed:
    family: int  # 4 or 6
    proto: int
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    sport: int
    dport: int
    vlan_outer: int
    vlan_inner: int
    pppoe_sid: int
    dsa_port: int
    pppoe: bool
    dsa_len: int
    l3_off: int
    l4_off: int
    l3_len: int
    l3l4_hlen: int
    ttl: int
    tcp_flags: int

    def key(self, ifindex: int) -> FlowKey:
        return FlowKey(ifindex=ifindex,
                       family=socket.AF_INET if self.family == 4 else socket.AF_INET6,
                       proto=self.proto, src=self.src, dst=self.dst, sport=self.sport,
                       dport=self.dport, vlan_outer=self.vlan_outer,
                       vlan_inner=self.vlan_inner, pppoe_sid=self.pppoe_sid,
                       dsa_port=self.dsa_port)


class Unparsed(Exception):
    """The frame is not one the datapath offloads; ``stat`` says why."""

    def __init__(self, stat: str, why: str):
        super().__init__(why)
        self.stat = stat


def _need(frame: bytes, end: int, what: str) -> None:
    if len(frame) < end:
        raise Unparsed("pass_l2", f"truncated {what}")


def parse(frame: bytes, dsa_proto: int) -> Parsed:
    """Walk the frame as the spec says; raise Unparsed for anything else.

    Reasons counted as pass_l3 (per offload.h): IPv4 options or fragments,
    IPv6 extension headers, an L4 protocol other than TCP/UDP. Everything
    else that does not parse is pass_l2."""
    off = 12
    dsa_port, dsa_len = DSA_PORT_NONE, 0
    if dsa_proto == DSA_GSWIP:
        _need(frame, 8, "gswip header")
        dsa_port, dsa_len = (frame[7] >> 4) & 7, 8
    elif dsa_proto == DSA_MTK:
        _need(frame, off + 4, "mtk tag")
        dsa_port, dsa_len = frame[off + 1] & 7, 4
    elif dsa_proto == DSA_QCA:
        _need(frame, off + 2, "qca tag")
        hdr = int.from_bytes(frame[off : off + 2], "big")
        if hdr >> 14 != 2 or (hdr >> 6) & 0x1F != 0:
            raise Unparsed("pass_l2", "qca: not version 2 type 0")
        dsa_port, dsa_len = hdr & 7, 2
    off += dsa_len
    _need(frame, off + 2, "ethertype")
    etype = int.from_bytes(frame[off : off + 2], "big")
    off += 2
    vids: list[int] = []
    while etype in (ETH_P_8021Q, ETH_P_8021AD):
        if len(vids) == 2:
            raise Unparsed("pass_l2", "three VLAN tags")
        _need(frame, off + 4, "VLAN tag")
        vids.append(int.from_bytes(frame[off : off + 2], "big") & 0xFFF)
        etype = int.from_bytes(frame[off + 2 : off + 4], "big")
        off += 4
    vids += [0, 0]
    pppoe_sid, pppoe = 0, False
    if etype == ETH_P_PPP_SES:
        _need(frame, off + 8, "PPPoE header")
        if frame[off] != 0x11 or frame[off + 1] != 0:
            raise Unparsed("pass_l2", "PPPoE: not a v1 session frame")
        pppoe_sid = int.from_bytes(frame[off + 2 : off + 4], "big")
        ppp = int.from_bytes(frame[off + 6 : off + 8], "big")
        if ppp not in (PPP_IP, PPP_IPV6):
            raise Unparsed("pass_l2", "PPP protocol not IP")
        etype = ETH_P_IP if ppp == PPP_IP else ETH_P_IPV6
        pppoe = True
        off += 8
    l3_off = off
    if etype == ETH_P_IP:
        _need(frame, off + 20, "IPv4 header")
        if frame[off] >> 4 != 4 or frame[off] & 0xF < 5:
            raise Unparsed("pass_l2", "not an IPv4 header")
        if frame[off] & 0xF > 5:
            raise Unparsed("pass_l3", "IPv4 options")
        if int.from_bytes(frame[off + 6 : off + 8], "big") & 0x3FFF:
            raise Unparsed("pass_l3", "IPv4 fragment")
        l3_len = int.from_bytes(frame[off + 2 : off + 4], "big")
        if l3_len < 20:
            raise Unparsed("pass_l2", "IPv4 total length below 20")
        family, proto, ttl = 4, frame[off + 9], frame[off + 8]
        src: ipaddress.IPv4Address | ipaddress.IPv6Address
        src = ipaddress.IPv4Address(frame[off + 12 : off + 16])
        dst: ipaddress.IPv4Address | ipaddress.IPv6Address
        dst = ipaddress.IPv4Address(frame[off + 16 : off + 20])
        off += 20
    elif etype == ETH_P_IPV6:
        _need(frame, off + 40, "IPv6 header")
        if frame[off] >> 4 != 6:
            raise Unparsed("pass_l2", "not an IPv6 header")
        l3_len = 40 + int.from_bytes(frame[off + 4 : off + 6], "big")
        family, proto, ttl = 6, frame[off + 6], frame[off + 7]
        src = ipaddress.IPv6Address(frame[off + 8 : off + 24])
        dst = ipaddress.IPv6Address(frame[off + 24 : off + 40])
        off += 40
    else:
        raise Unparsed("pass_l2", f"ethertype {etype:#06x}")
    if l3_off + l3_len > len(frame):
        raise Unparsed("pass_l2", "L3 length beyond the frame")
    l4_off = off
    tcp_flags = 0
    if proto == socket.IPPROTO_TCP:
        _need(frame, off + 20, "TCP header")
        doff = frame[off + 12] >> 4
        if doff < 5:
            raise Unparsed("pass_l2", "TCP data offset below 5")
        tcp_flags = frame[off + 13]
        l3l4_hlen = off - l3_off + doff * 4
    elif proto == socket.IPPROTO_UDP:
        _need(frame, off + 8, "UDP header")
        l3l4_hlen = off - l3_off + 8
    else:
        raise Unparsed("pass_l3", f"L4 protocol {proto}" + (" (IPv6 extension header?)"
                                                            if family == 6 else ""))
    if l3l4_hlen > l3_len:
        raise Unparsed("pass_l2", "L3 length shorter than the headers")
    return Parsed(
        family=family, proto=proto, src=src, dst=dst,
        sport=int.from_bytes(frame[off : off + 2], "big"),
        dport=int.from_bytes(frame[off + 2 : off + 4], "big"),
        vlan_outer=vids[0], vlan_inner=vids[1], pppoe_sid=pppoe_sid, dsa_port=dsa_port,
        pppoe=pppoe, dsa_len=dsa_len, l3_off=l3_off, l4_off=l4_off, l3_len=l3_len,
        l3l4_hlen=l3l4_hlen, ttl=ttl, tcp_flags=tcp_flags,
    )


# -- state and decision -------------------------------------------------------
@dataclass
class Flow:
    verdict: Verdict
    state: int = STATE_OFFLOAD
    seen: int = 0
    packets: int = 0


@dataclass
class World:
    """What the datapath's maps hold, as the model sees it."""

    flows: dict[FlowKey, Flow] = field(default_factory=dict)
    pending: set[FlowKey] = field(default_factory=set)
    dsa_proto: int = DSA_NONE  # of the ingress device
    ifindex: int = 1
    enabled: bool = True
    fresh: bool = True  # heartbeat


@dataclass(frozen=True)
class Outcome:
    action: str  # PASS or REDIRECT
    frame: bytes
    stat: str | None  # the counter that moves besides rx (None: none)
    why: str = ""
    key: FlowKey | None = None
    l3_off: int = 0  # of the output frame (for checksum checks)

    def retval(self, hook: str) -> int:
        return RETVAL[(hook, self.action)]


def bswap16(v: int) -> int:
    return ((v & 0xFF) << 8) | (v >> 8)


def ip_decrease_ttl_check(check: int) -> int:
    """The kernel's ip_decrease_ttl() on a network-order checksum value: it
    adds htons(0x0100) to the field's native u16 view, with end-around carry
    folded as ``check + (check >= 0xffff)``."""
    little = sys.byteorder == "little"
    native = bswap16(check) if little else check
    n = native + (0x0001 if little else 0x0100)
    n = (n + (n >= 0xFFFF)) & 0xFFFF
    return bswap16(n) if little else n


def verdict_deltas(v: Verdict) -> tuple[int, int, int, int]:
    """(flags, l3 delta, l4 address delta, l4 port delta) as Verdict.pack() sets them."""
    k = v.key
    new_src = v.nat_src or k.src
    new_dst = v.nat_dst or k.dst
    new_sport = k.sport if v.nat_sport is None else v.nat_sport
    new_dport = k.dport if v.nat_dport is None else v.nat_dport
    flags = ((new_src != k.src) * 1 | (new_dst != k.dst) * 2 | (new_sport != k.sport) * 4
             | (new_dport != k.dport) * 8)
    addr = csum.delta(k.src.packed + k.dst.packed, new_src.packed + new_dst.packed)
    port = csum.delta(k.sport.to_bytes(2, "big") + k.dport.to_bytes(2, "big"),
                      new_sport.to_bytes(2, "big") + new_dport.to_bytes(2, "big"))
    return flags, addr if k.family == socket.AF_INET else 0, addr, port


def rewrite_l3l4(frame: bytes, p: Parsed, v: Verdict) -> bytes:
    """NAT, TTL/hop limit and checksums on everything from L3 on."""
    flags, d_l3, d_addr, d_port = verdict_deltas(v)
    b = bytearray(frame[p.l3_off :])
    if p.family == 4:
        if flags & 1:
            b[12:16] = v.nat_src.packed  # type: ignore[union-attr]
        if flags & 2:
            b[16:20] = v.nat_dst.packed  # type: ignore[union-attr]
        c = csum.apply(int.from_bytes(b[10:12], "big"), d_l3)
        b[10:12] = ip_decrease_ttl_check(c).to_bytes(2, "big")
        b[8] -= 1
    else:
        if flags & 1:
            b[8:24] = v.nat_src.packed  # type: ignore[union-attr]
        if flags & 2:
            b[24:40] = v.nat_dst.packed  # type: ignore[union-attr]
        b[7] -= 1
    l4 = p.l4_off - p.l3_off
    if flags & 4:
        b[l4 : l4 + 2] = v.nat_sport.to_bytes(2, "big")  # type: ignore[union-attr]
    if flags & 8:
        b[l4 + 2 : l4 + 4] = v.nat_dport.to_bytes(2, "big")  # type: ignore[union-attr]
    at = l4 + (16 if p.proto == socket.IPPROTO_TCP else 6)
    check = int.from_bytes(b[at : at + 2], "big")
    # The address delta, then the port delta, each the way the kernel's
    # csum_replace_by_diff() applies it (bpf_l4_csum_replace in TC), skipped
    # when zero. UDP: no checksum stays none, a zero result becomes 0xffff.
    for delta in (d_addr, d_port):
        if not delta:
            continue
        if p.proto == socket.IPPROTO_UDP and check == 0:
            break
        check = csum.replace_by_diff(check, delta)
        if p.proto == socket.IPPROTO_UDP and check == 0:
            check = 0xFFFF
    b[at : at + 2] = check.to_bytes(2, "big")
    return bytes(b)


def has_encap(l2: L2Header) -> bool:
    return bool(l2.vlans or l2.pppoe_sid or l2.dsa_proto)


def expect(frame: bytes, world: World, hook: str, *, gso_size: int = 0,
           gso_segs: int = 0) -> Outcome:
    """What the datapath must do with ``frame``; updates ``world`` (pending
    tuples, seen bits, counters) the way the datapath updates its maps."""
    unchanged = frame
    try:
        p = parse(frame, world.dsa_proto)
    except Unparsed as exc:
        return Outcome(PASS, unchanged, exc.stat, str(exc))
    key = p.key(world.ifindex)
    if not world.enabled:
        return Outcome(PASS, unchanged, None, "offload disabled", key)
    if not world.fresh:
        return Outcome(PASS, unchanged, "pass_stale", "heartbeat stale", key)
    flow = world.flows.get(key)
    if flow is None:
        if key in world.pending:
            return Outcome(PASS, unchanged, "pending", "pending tuple", key)
        world.pending.add(key)
        return Outcome(PASS, unchanged, "new", "new tuple", key)
    if flow.state != STATE_OFFLOAD:
        return Outcome(PASS, unchanged, "pass_verdict", "flow decided as pass", key)
    if p.proto == socket.IPPROTO_TCP and p.tcp_flags & (TCP_FIN | TCP_SYN | TCP_RST):
        flow.seen |= ((SEEN_FIN if p.tcp_flags & TCP_FIN else 0)
                      | (SEEN_RST if p.tcp_flags & TCP_RST else 0)
                      | (SEEN_SYN if p.tcp_flags & TCP_SYN else 0))
        return Outcome(PASS, unchanged, "pass_tcp_flags", "TCP SYN/FIN/RST", key)
    if flow.seen & (SEEN_FIN | SEEN_RST):
        return Outcome(PASS, unchanged, "pass_tcp_flags", "closing: FIN/RST seen", key)
    if p.ttl <= 1:
        flow.seen |= SEEN_KERNEL
        return Outcome(PASS, unchanged, "pass_ttl", "TTL <= 1", key)
    v = flow.verdict
    seg_len = p.l3l4_hlen + gso_size if (hook == TC and gso_size) else p.l3_len
    if seg_len > v.mtu:
        flow.seen |= SEEN_KERNEL
        return Outcome(PASS, unchanged, "pass_mtu", "over MTU", key)
    if hook == TC and (p.pppoe or p.dsa_len or (gso_size and has_encap(v.l2))):
        flow.seen |= SEEN_KERNEL
        return Outcome(PASS, unchanged, "pass_unsupported", "TC cannot rewrite this", key)
    l2 = egress_l2(v.l2, p.family, p.l3_len)
    out = l2 + rewrite_l3l4(frame, p, v)
    flow.packets += gso_segs if (hook == TC and gso_segs) else 1
    return Outcome(REDIRECT, out, "redirect", "forwarded", key, l3_off=len(l2))


# -- checksums by scapy -------------------------------------------------------
def _same_csum(a: int, b: int) -> bool:
    """Equal under one's complement: 0x0000 and 0xffff are both zero."""
    return a == b or {a, b} == {0, 0xFFFF}


def checksum_problems(frame: bytes, l3_off: int) -> list[str]:
    """Checksums of the L3 packet at ``l3_off`` that scapy computes differently
    (empty: all verify). A UDP checksum of 0 over IPv4 means none and is fine."""
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6

    family = frame[l3_off] >> 4
    if family == 4:
        l3_len = int.from_bytes(frame[l3_off + 2 : l3_off + 4], "big")
        pkt = IP(frame[l3_off : l3_off + l3_len])
    else:
        l3_len = 40 + int.from_bytes(frame[l3_off + 4 : l3_off + 6], "big")
        pkt = IPv6(frame[l3_off : l3_off + l3_len])
    fresh = pkt.copy()
    problems = []
    layers = [(IP, "IPv4 header")] if family == 4 else []
    layers += [(TCP, "TCP"), (UDP, "UDP")]
    for layer, _ in layers:
        if layer in fresh:
            del fresh[layer].chksum
    fresh = fresh.__class__(bytes(fresh))
    for layer, name in layers:
        if layer not in pkt:
            continue
        got, want = pkt[layer].chksum, fresh[layer].chksum
        if layer is UDP and got == 0 and family == 4:
            continue
        if not _same_csum(got, want):
            problems.append(f"{name} checksum {got:#06x}, scapy computes {want:#06x}")
    return problems


# -- test traffic -------------------------------------------------------------
ADDRS = {
    4: (ipaddress.ip_address("198.18.0.10"), ipaddress.ip_address("198.19.0.20")),
    6: (ipaddress.ip_address("2001:db8:1::10"), ipaddress.ip_address("2001:db8:2::20")),
}
NAT_ADDRS = {
    4: (ipaddress.ip_address("198.18.255.1"), ipaddress.ip_address("198.19.255.2")),
    6: (ipaddress.ip_address("2001:db8:ff::1"), ipaddress.ip_address("2001:db8:fe::2")),
}
SPORT, DPORT = 40000, 443
NAT_SPORT, NAT_DPORT = 61000, 8443
DMAC_OUT, SMAC_OUT = bytes.fromhex("02aa00000001"), bytes.fromhex("02bb00000002")
NATS = ("none", "snat", "dnat", "snat_port", "dnat_port")


def l3_packet(family: int, l4: str, *, ttl: int = 64, payload: bytes = b"x" * 20,
              tcp_flags: str = "PA", sport: int = SPORT, dport: int = DPORT,
              src: str | None = None, dst: str | None = None) -> bytes:
    """An IPv4/IPv6 packet with valid checksums; ``l4`` is tcp, udp or udp0
    (UDP without a checksum)."""
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6

    s = src or str(ADDRS[family][0])
    d = dst or str(ADDRS[family][1])
    ip = IP(src=s, dst=d, ttl=ttl) if family == 4 else IPv6(src=s, dst=d, hlim=ttl)
    if l4 == "tcp":
        seg = TCP(sport=sport, dport=dport, flags=tcp_flags, seq=1000, ack=2000, window=501)
    elif l4 == "udp":
        seg = UDP(sport=sport, dport=dport)
    else:
        seg = UDP(sport=sport, dport=dport, chksum=0)
    return bytes(ip / seg / payload)


def flow_key(encap: Encap, family: int, l4: str, ifindex: int = 1) -> FlowKey:
    src, dst = ADDRS[family]
    return FlowKey(ifindex=ifindex, family=socket.AF_INET if family == 4 else socket.AF_INET6,
                   proto=socket.IPPROTO_TCP if l4 == "tcp" else socket.IPPROTO_UDP,
                   src=src, dst=dst, sport=SPORT, dport=DPORT, **encap.key_fields())


def make_verdict(key: FlowKey, egress: Encap, nat: str = "none", *, mtu: int = 1500,
                 oif: int = 1) -> Verdict:
    family = 4 if key.family == socket.AF_INET else 6
    nsrc, ndst = NAT_ADDRS[family]
    return Verdict(
        oif=oif, l2=egress.l2header(DMAC_OUT, SMAC_OUT), mtu=mtu, key=key,
        nat_src=nsrc if nat.startswith("snat") else None,
        nat_dst=ndst if nat.startswith("dnat") else None,
        nat_sport=NAT_SPORT if nat == "snat_port" else None,
        nat_dport=NAT_DPORT if nat == "dnat_port" else None,
    )
