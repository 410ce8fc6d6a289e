"""nf_conntrack over netlink: look up, refresh and follow connections.

Everything goes over raw NETLINK_NETFILTER sockets, encoded and decoded by
offloader/ctnetlink.py: events from one bound to the NEW, UPDATE and
DESTROY groups, queries and updates (refreshes, the liberal flag) on
non-blocking sockets of their own. pyroute2's NFCTSocket is not used: its
synchronous API runs an asyncio loop per call (about 1 ms a query).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

from pyroute2.netlink import NETLINK_NETFILTER
from pyroute2.netlink.nfnetlink.nfctsocket import (
    IPS_ASSURED,
    IPS_DST_NAT,
    IPS_SRC_NAT,
    TCP_CONNTRACK_CLOSE,
    TCP_CONNTRACK_FIN_WAIT,
    NFCTAttrTuple,
)

from . import ctnetlink
from .errors import OffloadError

log = logging.getLogger(__name__)

# Constants from their owner: pyroute2's netlink modules (uapi values).
OFFLOADED_KEPT = 65536  # new flows queued for their long timeout between two sweep ticks
IPS_HW_OFFLOAD = 1 << 15  # ip_conntrack_status (uapi nf_conntrack_common.h); pyroute2 lacks it


def tcp_closing(state: int) -> bool:
    """Conntrack's TCP states FIN_WAIT .. CLOSE (enum tcp_conntrack): closing."""
    return bool(TCP_CONNTRACK_FIN_WAIT <= state <= TCP_CONNTRACK_CLOSE)


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Tuple5(NamedTuple):
    """A connection tuple as it appears on the wire in one direction.
    (Named tuples, as CtEntry and CtEvent: built for every conntrack event,
    and a frozen dataclass's __init__ cost a microsecond a field.)"""

    proto: int
    src: IPAddress
    dst: IPAddress
    sport: int
    dport: int

    @property
    def family(self) -> int:
        return socket.AF_INET if self.src.version == 4 else socket.AF_INET6

    def attr(self) -> NFCTAttrTuple:
        return NFCTAttrTuple(family=self.family, saddr=str(self.src), daddr=str(self.dst),
                             proto=self.proto, sport=self.sport, dport=self.dport)


class CtEntry(NamedTuple):
    orig: Tuple5
    reply: Tuple5
    status: int
    tcp_state: int  # -1 for UDP
    zone: int
    helper: bool
    timeout: int
    mark: int = 0  # CTA_MARK: mwan3, pbr and fw4 restore it as the packet mark

    @property
    def assured(self) -> bool:
        return bool(self.status & IPS_ASSURED)

    @property
    def nat(self) -> bool:
        return bool(self.status & (IPS_SRC_NAT | IPS_DST_NAT))


class CtEvent(NamedTuple):
    """A conntrack event, with its two tuples' wire ids (read from the
    message's bytes). A destroy carries only those (cheap bytes: an event
    flood must not build objects the heap keeps)."""

    kind: str  # "new", "update", "destroy"
    entry: CtEntry | None
    orig_id: bytes = b""
    reply_id: bytes = b""


WIRE_ID = struct.Struct("!BHH16s16s")  # addresses NUL-padded to 16 bytes


def wire_id(proto: int, sport: int, dport: int, src: bytes, dst: bytes) -> bytes:
    """Compact identity of a wire tuple, the same from a flow key, a
    conntrack tuple or a raw ctnetlink tuple."""
    return WIRE_ID.pack(proto, sport, dport, src, dst)


def raw_wire_id(t: ctnetlink.Raw5) -> bytes:
    return wire_id(t[0], t[3], t[4], t[1], t[2])


def _tuple(msg: Any, which: str) -> Tuple5 | None:
    t = msg.get(which)
    if t is None:
        return None
    ip = t.get("CTA_TUPLE_IP")
    proto = t.get("CTA_TUPLE_PROTO")
    if ip is None or proto is None:
        return None
    src = ip.get("CTA_IP_V4_SRC") or ip.get("CTA_IP_V6_SRC")
    dst = ip.get("CTA_IP_V4_DST") or ip.get("CTA_IP_V6_DST")
    num = proto.get("CTA_PROTO_NUM")
    if src is None or dst is None or num not in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
        return None
    return Tuple5(num, ipaddress.ip_address(src), ipaddress.ip_address(dst),
                  proto.get("CTA_PROTO_SRC_PORT") or 0, proto.get("CTA_PROTO_DST_PORT") or 0)


def parse_entry(msg: Any) -> CtEntry | None:
    """A CtEntry from a pyroute2 conntrack message (TCP/UDP only)."""
    orig = _tuple(msg, "CTA_TUPLE_ORIG")
    reply = _tuple(msg, "CTA_TUPLE_REPLY")
    if orig is None or reply is None:
        return None
    tcp_state = -1
    info = msg.get("CTA_PROTOINFO")
    if info is not None:
        tcp = info.get("CTA_PROTOINFO_TCP")
        if tcp is not None:
            state = tcp.get("CTA_PROTOINFO_TCP_STATE")
            tcp_state = -1 if state is None else int(state)
    return CtEntry(orig, reply, int(msg.get("CTA_STATUS") or 0), tcp_state,
                   int(msg.get("CTA_ZONE") or 0), msg.get("CTA_HELP") is not None,
                   int(msg.get("CTA_TIMEOUT") or 0), int(msg.get("CTA_MARK") or 0))


class Conntrack:
    """Queries and updates; one socket per address family."""

    def __init__(self) -> None:
        self._query: socket.socket | None = None
        self._raw: socket.socket | None = None
        self._delete: socket.socket | None = None
        self._seq = 0
        self._qseq = 0
        self.update_failures = 0
        self.gone: list[bytes] = []
        self._inflight: dict[int, bytes] = {}  # sequence number -> tag, until answered
        self._templates: dict[tuple[int, int, bool, int, int], ctnetlink.RefreshTemplate] = {}
        self._offloaded: list[tuple[bytes, bool, int, bool]] = []
        self.offloaded_dropped = 0  # beyond OFFLOADED_KEPT: renewed when first due instead

    def get(self, t: Tuple5, zone: int = 0) -> tuple[CtEntry, bool] | None:
        """The entry ``t`` belongs to, and True when ``t`` is its reply
        direction. One raw query on a non-blocking socket of its own: the
        kernel answers inside the send, so the answer is read at once and
        nothing waits (pyroute2's query cost about 1 ms, twice that for a
        tuple without an entry, and under a burst of new tuples those
        queries were where the agent's time went)."""
        self._qseq += 1
        seq = self._qseq
        sock = self._querier()
        try:
            sock.send(ctnetlink.encode_get(seq, _raw5(t), zone=zone))
        except OSError as exc:
            raise OffloadError(f"conntrack lookup failed: {exc}") from exc
        found: tuple[CtEntry, bool] | None = None
        while True:
            try:
                data = sock.recv(1 << 16)
            except OSError as exc:  # BlockingIOError: the answer was lost (buffer full)
                raise OffloadError(f"conntrack lookup: no answer ({exc})") from exc
            for msg in ctnetlink.decode(data):
                if msg.seq != seq:  # an answer to an earlier query that gave up
                    continue
                if isinstance(msg, ctnetlink.Ack):
                    if msg.error in (0, -errno.ENOENT):
                        return found
                    raise OffloadError(f"conntrack lookup failed: {os.strerror(-msg.error)}")
                if isinstance(msg, ctnetlink.Decoded):
                    entry = _entry_from(msg)
                    if entry is not None:
                        # Found by either direction's tuple: compare to tell.
                        found = entry, entry.orig != t

    def _querier(self) -> socket.socket:
        if self._query is None:
            self._query = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            self._query.bind((0, 0))
            self._query.setblocking(False)
        return self._query

    def _writer(self) -> socket.socket:
        if self._raw is None:
            self._raw = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            self._raw.bind((0, 0))
            self._raw.setblocking(False)  # never stall the agent's loop
        return self._raw

    def _deleter(self) -> socket.socket:
        """Deletions go out from a socket of their own: the agent's event
        socket drops what the writer causes (CtEvents.ignore_sender), and a
        deleted entry's DESTROY event must reach it as the kernel's own."""
        if self._delete is None:
            self._delete = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            self._delete.bind((0, 0))
            self._delete.setblocking(False)
        return self._delete

    def _drain(self, sock: socket.socket | None = None) -> None:
        """Read what the kernel answered. It handles each message inside the
        sendmsg() call, so the answers to what was just sent are queued by
        now: nothing here waits. An update that failed because the entry is
        gone (ENOENT) puts its tag on ``gone``; other failures are counted."""
        sock = sock or self._writer()
        while True:
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:  # ENOBUFS: answers lost, the next sweep retries
                log.debug("conntrack answers lost: %s", exc)
                self.update_failures += 1
                break
            for msg in ctnetlink.decode(data):
                if not isinstance(msg, ctnetlink.Ack):
                    continue
                tag = self._inflight.pop(msg.seq, None)
                if msg.error == -errno.ENOENT and tag is not None:
                    if tag:  # b"": gone is fine (a timeout put back, an entry deleted)
                        self.gone.append(tag)
                elif msg.error:
                    self.update_failures += 1
        self._inflight.clear()

    def _send(self, messages: list[tuple[bytes, bytes | None]],
              sock: socket.socket | None = None) -> None:
        """Send (message, tag) pairs in one sendmsg() and read the answers."""
        for msg, tag in messages:
            if tag is not None:
                self._inflight[struct.unpack_from("=I", msg, 8)[0]] = tag
        sock = sock or self._writer()
        try:
            sock.send(b"".join(m for m, _ in messages))
        except OSError as exc:
            self._inflight.clear()
            raise OffloadError(f"conntrack update failed: {exc}") from exc
        self._drain(sock)

    def set_liberal(self, t: Tuple5, reply: bool, zone: int, tag: bytes) -> None:
        """Make conntrack's TCP window tracking liberal for this connection,
        both directions, as nf_flow_table does for the flows it offloads: the
        kernel no longer sees the offloaded direction's segments, so without
        it the other direction's ACKs look out of window, turn INVALID, miss
        their NAT and draw a RST. Per connection; no sysctl changes. When the
        entry is gone, ``tag`` (the flow's key) lands on ``gone``."""
        self._seq += 1
        msg = ctnetlink.encode_update(self._seq, _raw5(t), reply=reply, zone=zone, liberal=True,
                                      ack=True)
        self._send([(msg, tag)])

    def refresh_many(self, items: Sequence[tuple[Tuple5 | ctnetlink.Raw5, bool, int, int]],
                     tags: Sequence[bytes] | None = None, batch: int = 256) -> int:
        """Set the timeout of many entries ((tuple, is reply, zone, timeout);
        the tuple as a Tuple5 or already raw), ``batch`` messages to a
        sendmsg() without acknowledgements. Returns how many were sent. An
        entry found gone puts its tag (``tags[i]``, the flow's key) on
        ``gone``; other failures show in update_failures."""
        self._drain()
        sent = 0
        for i in range(0, len(items), batch):
            chunk: list[tuple[bytes, bytes | None]] = []
            for n, (t, reply, zone, timeout) in enumerate(items[i : i + batch], start=i):
                self._seq += 1
                raw = _raw5(t) if isinstance(t, Tuple5) else t
                chunk.append((ctnetlink.encode_update(self._seq, raw, reply=reply, zone=zone,
                                                      timeout=timeout),
                              tags[n] if tags is not None else None))
            self._send(chunk)
            sent += len(chunk)
        return sent

    def refresh_keys(self, items: Sequence[tuple[bytes, bytes, bytes, bytes, int, bool, int, int]],
                     tags: Sequence[bytes], batch: int = 256) -> int:
        """refresh_many from a flow key's own bytes: (source, destination,
        source port, destination port, all in network order, protocol, is
        reply, zone, timeout) each, with its tag. Each message is packed
        from a template of its shape (ctnetlink.RefreshTemplate): the
        sweep sends thousands a second at 100,000 flows."""
        self._drain()
        templates = self._templates
        sent = 0
        for i in range(0, len(items), batch):
            chunk: list[tuple[bytes, bytes | None]] = []
            for n, (src, dst, sport, dport, proto, reply, zone, timeout) in enumerate(
                    items[i : i + batch], start=i):
                shape = (len(src), proto, reply, zone, timeout)
                tmpl = templates.get(shape)
                if tmpl is None:
                    if len(templates) >= 1024:  # zones x classes: a few in practice
                        templates.clear()
                    tmpl = templates[shape] = ctnetlink.RefreshTemplate(
                        len(src), proto, reply=reply, zone=zone, timeout=timeout)
                self._seq += 1
                chunk.append((tmpl.message(self._seq, src, dst, sport, dport), tags[n]))
            self._send(chunk)
            sent += len(chunk)
        return sent

    def offloaded(self, raw_key: bytes, reply: bool, zone: int, assured: bool) -> None:
        """A flow was just offloaded (raw key, is reply, zone, assured): the
        sweep's next tick gives its entry the long timeout (take_offloaded).
        Queued, not sent: new flows come by the thousand a second and the
        tick sends them 256 to a sendmsg()."""
        if len(self._offloaded) < OFFLOADED_KEPT:
            self._offloaded.append((raw_key, reply, zone, assured))
        else:
            self.offloaded_dropped += 1

    def take_offloaded(self) -> list[tuple[bytes, bool, int, bool]]:
        got, self._offloaded = self._offloaded, []
        return got

    def put_back(self, items: Sequence[tuple[bytes, bytes, bytes, bytes, int, bool, int, int]],
                 batch: int = 256) -> int:
        """Hand entries back to their own timeout: (source, destination,
        source port, destination port in network order, protocol, is reply,
        zone, timeout) each; timeout 0 deletes the entry (the kernel would
        have forgotten it by now: deleted, it leaves ``conntrack -L`` at once
        and its DESTROY event goes out, as when conntrack reaps it). An
        entry already gone is no failure. Returns how many were sent."""
        self._drain()
        updates: list[tuple[bytes, bytes | None]] = []
        deletes: list[tuple[bytes, bytes | None]] = []
        for src, dst, sport, dport, proto, reply, zone, timeout in items:
            self._seq += 1
            raw = (proto, src, dst, int.from_bytes(sport, "big"), int.from_bytes(dport, "big"))
            if timeout > 0:
                updates.append((ctnetlink.encode_update(self._seq, raw, reply=reply, zone=zone,
                                                        timeout=timeout), b""))
            else:
                deletes.append((ctnetlink.encode_delete(self._seq, raw, reply=reply, zone=zone),
                                b""))
        for i in range(0, len(updates), batch):
            self._send(updates[i : i + batch])
        for i in range(0, len(deletes), batch):
            self._send(deletes[i : i + batch], self._deleter())
        return len(updates) + len(deletes)

    def portid(self) -> int:
        """The netlink port id the updates go out from: the kernel stamps it
        on the UPDATE event each of them causes (CtEvents.ignore_sender)."""
        port: int = self._writer().getsockname()[0]
        return port

    def take_gone(self) -> list[bytes]:
        """Tags of updates whose entry conntrack no longer had."""
        gone, self.gone = self.gone, []
        return gone

    def close(self) -> None:
        if self._query is not None:
            self._query.close()
            self._query = None
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        if self._delete is not None:
            self._delete.close()
            self._delete = None


def _raw5(t: Tuple5) -> ctnetlink.Raw5:
    return (t.proto, t.src.packed, t.dst.packed, t.sport, t.dport)


class _Address4(ipaddress.IPv4Address):
    """An IPv4Address that hashes once. ipaddress hashes an address by
    formatting it in hex every time (0.56 us here); the agent keys its
    caches on an event's addresses several times per new flow (path,
    verdict template, next hop). Equal to, and hashed like, the plain one."""

    __slots__ = ("_hash",)

    def __init__(self, address: bytes) -> None:
        super().__init__(address)
        self._hash = ipaddress.IPv4Address.__hash__(self)

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"IPv4Address({str(self)!r})"


class _Address6(ipaddress.IPv6Address):
    """_Address4's IPv6 counterpart."""

    __slots__ = ("_hash",)

    def __init__(self, address: bytes) -> None:
        super().__init__(address)
        self._hash = ipaddress.IPv6Address.__hash__(self)

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"IPv6Address({str(self)!r})"


def hashed_address(raw: bytes) -> IPAddress:
    """The address of packed ``raw``, as an object that hashes once."""
    return _Address4(raw) if len(raw) == 4 else _Address6(raw)


def _t5(raw: ctnetlink.Raw5 | None) -> Tuple5 | None:
    if raw is None or raw[0] not in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
        return None
    return Tuple5(raw[0], hashed_address(raw[1]), hashed_address(raw[2]), raw[3], raw[4])


def event_entry(msg: ctnetlink.Decoded) -> CtEntry | None:
    """The CtEntry of a decoded message (an event or a dumped entry), TCP/UDP only."""
    return _entry_from(msg)


def _entry_from(msg: ctnetlink.Decoded) -> CtEntry | None:
    orig, reply = _t5(msg.orig), _t5(msg.reply)
    if orig is None or reply is None:
        return None
    return CtEntry(orig, reply, msg.status, msg.tcp_state, msg.zone, msg.helper, msg.timeout,
                   msg.mark)


def nat_target(entry: CtEntry, reply: bool) -> Tuple5:
    """How a packet of this direction looks after NAT: the other direction's
    tuple reversed."""
    other = entry.orig if reply else entry.reply
    return Tuple5(other.proto, other.dst, other.src, other.dport, other.sport)
