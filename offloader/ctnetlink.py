"""A minimal ctnetlink codec for the agent's hot paths.

pyroute2 answers conntrack queries well but spends about 0.2 ms decoding one
event and 0.5 ms or more on one update, which caps an agent near 1,000 new
flows a second and makes refreshing 10,000 flows cost a core's tenth. The
hot paths need only a few attributes, so they are encoded and decoded here:

  - events (NEW/UPDATE/DESTROY): tuples, status, TCP state, helper, zone, mark;
  - updates (IPCTNL_MSG_CT_NEW on an existing entry): timeout, TCP flags;
  - deletions (IPCTNL_MSG_CT_DELETE of one tuple);
  - queries (IPCTNL_MSG_CT_GET of one tuple), answered inside sendmsg().

Updates go out many to one sendmsg() without NLM_F_ACK. The kernel handles
each message inside the sendmsg() call, so an update is in force when the
call returns; only failures come back, as NLMSG_ERROR, read later.
Attribute numbers are those of uapi linux/netfilter/nfnetlink_conntrack.h.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import struct
from collections.abc import Iterator
from typing import Any

from pyroute2.netlink import (
    NLA_F_NESTED,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
)
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_CTNETLINK
from pyroute2.netlink.nfnetlink.nfctsocket import (
    IP_CT_TCP_FLAG_BE_LIBERAL,
    IPCTNL_MSG_CT_DELETE,
    IPCTNL_MSG_CT_GET,
    IPCTNL_MSG_CT_NEW,
)

NLA_TYPE_MASK = 0x3FFF

CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_STATUS = 3
CTA_PROTOINFO = 4
CTA_HELP = 5
CTA_TIMEOUT = 7
CTA_MARK = 8
CTA_ZONE = 18
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_TCP_STATE = 1
CTA_PROTOINFO_TCP_FLAGS_ORIGINAL = 4
CTA_PROTOINFO_TCP_FLAGS_REPLY = 5

NLMSGHDR = struct.Struct("=IHHII")  # shared with conntrack.events_of
_NFGENMSG = struct.Struct("=BBH")
NLA = struct.Struct("=HH")

Raw5 = tuple[int, bytes, bytes, int, int]  # proto, src, dst, sport, dport


def _attr(kind: int, payload: bytes, nested: bool = False) -> bytes:
    head = NLA.pack(NLA.size + len(payload), kind | (NLA_F_NESTED if nested else 0))
    return head + payload + b"\0" * (-len(payload) % 4)


def encode_tuple(kind: int, t: Raw5) -> bytes:
    proto, src, dst, sport, dport = t
    v6 = len(src) == 16
    ip = _attr(CTA_IP_V6_SRC if v6 else CTA_IP_V4_SRC, src) + _attr(
        CTA_IP_V6_DST if v6 else CTA_IP_V4_DST, dst)
    l4 = (_attr(CTA_PROTO_NUM, bytes((proto,))) + _attr(CTA_PROTO_SRC_PORT, struct.pack("!H", sport))
          + _attr(CTA_PROTO_DST_PORT, struct.pack("!H", dport)))
    return _attr(kind, _attr(CTA_TUPLE_IP, ip, True) + _attr(CTA_TUPLE_PROTO, l4, True), True)


def encode_update(seq: int, t: Raw5, *, reply: bool, zone: int = 0, timeout: int | None = None,
                  liberal: bool = False, ack: bool = False) -> bytes:
    """An update of the entry ``t`` belongs to (``reply``: t is its reply tuple)."""
    if timeout is not None and not liberal:
        return _encode_refresh(seq, t, reply, zone, timeout, ack)
    return _encode_update_attrs(seq, t, reply=reply, zone=zone, timeout=timeout, liberal=liberal,
                                ack=ack)


def _refresh_struct(addr_len: int, zone: bool) -> struct.Struct:
    """A timeout update as one struct: nlmsghdr, nfgenmsg, the tuple nest
    (addresses, then protocol and ports), the timeout and maybe the zone,
    each attribute with its header and padding (big-endian fields are
    swapped by the caller)."""
    a = f"HH{addr_len}s"
    return struct.Struct("=IHHII" "BBH" "HH" "HH" + a + a + "HH" "HHB3x" "HHH2x" "HHH2x" "HHI"
                         + ("HHH2x" if zone else ""))


_REFRESH = {(n, z): _refresh_struct(n, z) for n in (4, 16) for z in (False, True)}


def _encode_refresh(seq: int, t: Raw5, reply: bool, zone: int, timeout: int, ack: bool) -> bytes:
    """encode_update for a timeout alone (the sweep's refreshes, thousands a
    second at 100,000 flows): one struct.pack, the same bytes as the
    attribute-by-attribute encoding (tests/unit/test_ctnetlink.py)."""
    proto, src, dst, sport, dport = t
    n = len(src)
    ip_len = 4 + 2 * (4 + n)
    tuple_len = 4 + ip_len + 28
    values = [20 + tuple_len + 8 + (8 if zone else 0), (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW,
              NLM_F_REQUEST | (NLM_F_ACK if ack else 0), seq, 0,
              socket.AF_INET6 if n == 16 else socket.AF_INET, 0, 0,
              tuple_len, (CTA_TUPLE_REPLY if reply else CTA_TUPLE_ORIG) | NLA_F_NESTED,
              ip_len, CTA_TUPLE_IP | NLA_F_NESTED,
              4 + n, CTA_IP_V6_SRC if n == 16 else CTA_IP_V4_SRC, src,
              4 + n, CTA_IP_V6_DST if n == 16 else CTA_IP_V4_DST, dst,
              28, CTA_TUPLE_PROTO | NLA_F_NESTED, 5, CTA_PROTO_NUM, proto,
              6, CTA_PROTO_SRC_PORT, socket.htons(sport), 6, CTA_PROTO_DST_PORT, socket.htons(dport),
              8, CTA_TIMEOUT, socket.htonl(timeout)]
    if zone:
        values += [6, CTA_ZONE, socket.htons(zone)]
    return _REFRESH[n, bool(zone)].pack(*values)


class RefreshTemplate:
    """Timeout updates of one shape (address length, protocol, direction,
    zone, timeout) from the fields that vary, in network byte order as a
    flow key holds them: one struct.pack of the constant parts around the
    sequence number, addresses and ports; the same bytes as encode_update."""

    def __init__(self, addr_len: int, proto: int, *, reply: bool, zone: int, timeout: int) -> None:
        n = addr_len
        whole = encode_update(0, (proto, b"\0" * n, b"\0" * n, 0, 0), reply=reply, zone=zone,
                              timeout=timeout)
        # seq at 8, addresses at 32 and 36 + n, ports at 52 + 2n and 60 + 2n
        cuts = [(8, 4), (32, n), (36 + n, n), (52 + 2 * n, 2), (60 + 2 * n, 2)]
        self._parts: list[bytes] = []
        fmt, pos = "=", 0
        for at, size in cuts:
            self._parts.append(whole[pos:at])
            fmt += f"{at - pos}s" + ("I" if at == 8 else f"{size}s")
            pos = at + size
        self._parts.append(whole[pos:])
        fmt += f"{len(whole) - pos}s"
        self._struct = struct.Struct(fmt)
        p = self._parts
        self._pack = functools.partial(_pack_around, self._struct.pack, p[0], p[1], p[2], p[3],
                                       p[4], p[5])

    def message(self, seq: int, src: bytes, dst: bytes, sport: bytes, dport: bytes) -> bytes:
        return self._pack(seq, src, dst, sport, dport)


def _pack_around(pack: Any, p0: bytes, p1: bytes, p2: bytes, p3: bytes, p4: bytes, p5: bytes,
                 seq: int, src: bytes, dst: bytes, sport: bytes, dport: bytes) -> bytes:
    out: bytes = pack(p0, seq, p1, src, p2, dst, p3, sport, p4, dport, p5)
    return out


def _encode_update_attrs(seq: int, t: Raw5, *, reply: bool, zone: int = 0,
                         timeout: int | None = None, liberal: bool = False,
                         ack: bool = False) -> bytes:
    """encode_update attribute by attribute (any combination of fields)."""
    body = encode_tuple(CTA_TUPLE_REPLY if reply else CTA_TUPLE_ORIG, t)
    if timeout is not None:
        body += _attr(CTA_TIMEOUT, struct.pack("!I", timeout))
    if liberal:
        be_liberal = struct.pack("BB", IP_CT_TCP_FLAG_BE_LIBERAL, IP_CT_TCP_FLAG_BE_LIBERAL)  # flags, mask
        tcp = (_attr(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, be_liberal)
               + _attr(CTA_PROTOINFO_TCP_FLAGS_REPLY, be_liberal))
        body += _attr(CTA_PROTOINFO, _attr(CTA_PROTOINFO_TCP, tcp, True), True)
    if zone:
        body += _attr(CTA_ZONE, struct.pack("!H", zone))
    family = socket.AF_INET6 if len(t[1]) == 16 else socket.AF_INET
    payload = _NFGENMSG.pack(family, 0, 0) + body
    flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
    kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
    return NLMSGHDR.pack(NLMSGHDR.size + len(payload), kind, flags, seq, 0) + payload


def encode_delete(seq: int, t: Raw5, *, reply: bool, zone: int = 0) -> bytes:
    """A deletion of the entry ``t`` belongs to (``reply``: t is its reply
    tuple), without acknowledgement: only a failure comes back. The kernel
    sends the entry's DESTROY event, as when its own timeout reaps it."""
    body = encode_tuple(CTA_TUPLE_REPLY if reply else CTA_TUPLE_ORIG, t)
    if zone:
        body += _attr(CTA_ZONE, struct.pack("!H", zone))
    family = socket.AF_INET6 if len(t[1]) == 16 else socket.AF_INET
    payload = _NFGENMSG.pack(family, 0, 0) + body
    kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
    return NLMSGHDR.pack(NLMSGHDR.size + len(payload), kind, NLM_F_REQUEST, seq, 0) + payload


def encode_get(seq: int, t: Raw5, *, zone: int = 0) -> bytes:
    """A query for the entry ``t`` belongs to, acknowledged. The kernel
    looks a tuple up in both directions' hash chains, so the original-tuple
    attribute finds an entry by its reply tuple as well."""
    body = encode_tuple(CTA_TUPLE_ORIG, t)
    if zone:
        body += _attr(CTA_ZONE, struct.pack("!H", zone))
    family = socket.AF_INET6 if len(t[1]) == 16 else socket.AF_INET
    payload = _NFGENMSG.pack(family, 0, 0) + body
    kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
    return NLMSGHDR.pack(NLMSGHDR.size + len(payload), kind, NLM_F_REQUEST | NLM_F_ACK, seq,
                          0) + payload


def _attrs(data: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    """Attribute type -> (payload start, payload end) in data[start:end]."""
    out: dict[int, tuple[int, int]] = {}
    pos = start
    while pos + 4 <= end:
        length, kind = NLA.unpack_from(data, pos)
        if length < 4 or pos + length > end:
            break
        out[kind & NLA_TYPE_MASK] = (pos + 4, pos + length)
        pos += (length + 3) & ~3
    return out


def _fixed_tuple(v6: bool) -> tuple[struct.Struct, tuple[bytes, ...]]:
    """The layout the kernel writes a TCP/UDP tuple in (ctnetlink_dump_tuples:
    addresses, then protocol number and ports), as one struct of the
    addresses, the protocol and the attribute headers between them, with
    the header bytes it must show (the ports are read after, in network
    order)."""
    n = 16 if v6 else 4
    head = NLA.pack
    heads = (head(4 + 2 * (4 + n), CTA_TUPLE_IP | NLA_F_NESTED)
             + head(4 + n, CTA_IP_V6_SRC if v6 else CTA_IP_V4_SRC),
             head(4 + n, CTA_IP_V6_DST if v6 else CTA_IP_V4_DST),
             head(28, CTA_TUPLE_PROTO | NLA_F_NESTED) + head(5, CTA_PROTO_NUM),
             head(6, CTA_PROTO_SRC_PORT), head(6, CTA_PROTO_DST_PORT))
    return struct.Struct(f"=8s{n}s4s{n}s8sB3x4s4x4s"), heads


Field = tuple[int, str]  # (offset, struct code): where a decode reads one header or value
_FIXED = {20 + 28: _fixed_tuple(False), 44 + 28: _fixed_tuple(True)}  # by the tuple's length
_PORTS = struct.Struct("!H6xH")  # source port, its padding and the next header, destination port


def tuple_at(data: bytes, span: tuple[int, int]) -> Raw5 | None:
    """The tuple nest whose payload is ``data[span[0]:span[1]]``."""
    fixed = _FIXED.get(span[1] - span[0])
    if fixed is not None:  # the usual layout, read in one step (events are decoded by the thousand)
        layout, heads = fixed
        h1, src, h2, dst, h3, proto, h4, h5 = layout.unpack_from(data, span[0])
        if (h1, h2, h3, h4, h5) == heads:
            sport, dport = _PORTS.unpack_from(data, span[0] + 28 + 2 * len(src))
            return (proto, src, dst, sport, dport)
    return _walked_tuple(data, span)


def tuple_fields(data: bytes, span: tuple[int, int]) -> tuple[list[Field], list[Field]] | None:
    """Where tuple_at reads the tuple nest ``data[span[0]:span[1]]`` when it
    has the usual layout: its attribute headers, and its protocol, source,
    destination, source port and destination port, each (offset, struct
    code, network order). None for another layout (tuple_at walks those)."""
    fixed = _FIXED.get(span[1] - span[0])
    if fixed is None:
        return None
    layout, heads = fixed
    h1, src, h2, dst, h3, _proto, h4, h5 = layout.unpack_from(data, span[0])
    if (h1, h2, h3, h4, h5) != heads:
        return None
    s, n = span[0], len(src)
    return ([(s, "8s"), (s + 8 + n, "4s"), (s + 12 + 2 * n, "8s"), (s + 24 + 2 * n, "4s"),
             (s + 32 + 2 * n, "4s")],
            [(s + 20 + 2 * n, "B"), (s + 8, f"{n}s"), (s + 12 + n, f"{n}s"), (s + 28 + 2 * n, "H"),
             (s + 36 + 2 * n, "H")])


def _walked_tuple(data: bytes, span: tuple[int, int]) -> Raw5 | None:
    """A tuple nest of any layout, attribute by attribute."""
    top = _attrs(data, *span)
    if CTA_TUPLE_IP not in top or CTA_TUPLE_PROTO not in top:
        return None
    ip = _attrs(data, *top[CTA_TUPLE_IP])
    l4 = _attrs(data, *top[CTA_TUPLE_PROTO])
    src = ip.get(CTA_IP_V4_SRC) or ip.get(CTA_IP_V6_SRC)
    dst = ip.get(CTA_IP_V4_DST) or ip.get(CTA_IP_V6_DST)
    num = l4.get(CTA_PROTO_NUM)
    if not src or not dst or not num or num[1] <= num[0]:
        return None
    return (data[num[0]], data[src[0]:src[1]], data[dst[0]:dst[1]],
            _port(data, l4.get(CTA_PROTO_SRC_PORT)), _port(data, l4.get(CTA_PROTO_DST_PORT)))


def _port(data: bytes, span: tuple[int, int] | None) -> int:
    """A port attribute's value; 0 when absent (ICMP) or short."""
    return int.from_bytes(data[span[0]:span[0] + 2], "big") if span and span[1] - span[0] >= 2 else 0


class Decoded:
    """One conntrack message: kind, flags, and the attributes we use."""

    __slots__ = ("msg_type", "flags", "seq", "orig", "reply", "status", "tcp_state", "helper",
                 "zone", "timeout", "mark")

    def __init__(self, msg_type: int, flags: int, seq: int = 0) -> None:
        self.msg_type = msg_type
        self.flags = flags
        self.seq = seq
        self.orig: Raw5 | None = None
        self.reply: Raw5 | None = None
        self.status = 0
        self.tcp_state = -1
        self.helper = False
        self.zone = 0
        self.timeout = 0
        self.mark = 0


class Done:
    """The end of a dump (NLMSG_DONE); ``interrupted`` when the table changed
    during it (NLM_F_DUMP_INTR: entries may have been missed)."""

    __slots__ = ("seq", "interrupted")

    def __init__(self, seq: int, interrupted: bool) -> None:
        self.seq = seq
        self.interrupted = interrupted


def encode_dump(seq: int, family: int) -> bytes:
    """A request for every conntrack entry of ``family`` (all zones)."""
    payload = _NFGENMSG.pack(family, 0, 0)
    kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
    return NLMSGHDR.pack(NLMSGHDR.size + len(payload), kind, NLM_F_REQUEST | NLM_F_DUMP, seq,
                          0) + payload


class Ack:
    """An NLMSG_ERROR: ``error`` is 0 (an acknowledgement) or a negative errno."""

    __slots__ = ("seq", "error")

    def __init__(self, seq: int, error: int) -> None:
        self.seq = seq
        self.error = error


def decode(data: bytes) -> Iterator[Decoded | Ack | Done]:
    """The conntrack messages, acknowledgements and dump ends in a netlink datagram."""
    pos = 0
    while pos + NLMSGHDR.size <= len(data):
        length, kind, flags, seq, _pid = NLMSGHDR.unpack_from(data, pos)
        if length < NLMSGHDR.size or pos + length > len(data):
            break
        end = pos + length
        if kind == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", data, pos + NLMSGHDR.size)
            yield Ack(seq, err)
        elif kind == NLMSG_DONE:
            yield Done(seq, bool(flags & NLM_F_DUMP_INTR))
        elif kind >> 8 == NFNL_SUBSYS_CTNETLINK:
            yield _decoded(data, pos, end, kind, flags, seq)
        pos += (length + 3) & ~3


def _decoded(data: bytes, pos: int, end: int, kind: int, flags: int, seq: int) -> Decoded:
    msg = Decoded(kind & 0xFF, flags, seq)
    top = _attrs(data, pos + NLMSGHDR.size + _NFGENMSG.size, end)
    if CTA_TUPLE_ORIG in top:
        msg.orig = tuple_at(data, top[CTA_TUPLE_ORIG])
    if CTA_TUPLE_REPLY in top:
        msg.reply = tuple_at(data, top[CTA_TUPLE_REPLY])
    if CTA_STATUS in top:
        msg.status = struct.unpack_from("!I", data, top[CTA_STATUS][0])[0]
    if CTA_TIMEOUT in top:
        msg.timeout = struct.unpack_from("!I", data, top[CTA_TIMEOUT][0])[0]
    if CTA_ZONE in top:
        msg.zone = struct.unpack_from("!H", data, top[CTA_ZONE][0])[0]
    if CTA_MARK in top:
        msg.mark = struct.unpack_from("!I", data, top[CTA_MARK][0])[0]
    msg.helper = CTA_HELP in top
    if CTA_PROTOINFO in top:
        msg.tcp_state = tcp_state(data, top[CTA_PROTOINFO])
    return msg


def tcp_state(data: bytes, protoinfo: tuple[int, int]) -> int:
    info = _attrs(data, *protoinfo)
    if CTA_PROTOINFO_TCP in info:
        tcp = _attrs(data, *info[CTA_PROTOINFO_TCP])
        state = tcp.get(CTA_PROTOINFO_TCP_STATE)
        if state and state[1] > state[0]:
            return data[state[0]]
    return -1


def walked_heads(data: bytes, start: int, end: int) -> tuple[list[Field], dict[int, tuple[int, int]]]:
    """_attrs, with where each attribute header it read was, the one it
    stopped at included: a message whose headers are the same bytes is
    walked the same way."""
    heads: list[Field] = []
    out: dict[int, tuple[int, int]] = {}
    pos = start
    while pos + 4 <= end:
        heads.append((pos, "4s"))
        length, kind = NLA.unpack_from(data, pos)
        if length < 4 or pos + length > end:
            break
        out[kind & NLA_TYPE_MASK] = (pos + 4, pos + length)
        pos += (length + 3) & ~3
    return heads, out


def tcp_state_fields(data: bytes, protoinfo: tuple[int, int]) -> tuple[list[Field], Field | None]:
    """Where tcp_state reads: the headers of the nests it walks, and the
    state's byte (None: tcp_state is -1)."""
    heads, info = walked_heads(data, *protoinfo)
    if CTA_PROTOINFO_TCP in info:
        more, tcp = walked_heads(data, *info[CTA_PROTOINFO_TCP])
        heads += more
        state = tcp.get(CTA_PROTOINFO_TCP_STATE)
        if state and state[1] > state[0]:
            return heads, (state[0], "B")
    return heads, None


def address(raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(raw)
