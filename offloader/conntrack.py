"""nf_conntrack over netlink: look up, refresh and follow connections.

Everything goes over raw NETLINK_NETFILTER sockets, encoded and decoded by
offloader/ctnetlink.py: events from one bound to the NEW, UPDATE and
DESTROY groups, queries and updates (refreshes, the liberal flag) on
non-blocking sockets of their own. pyroute2's NFCTSocket is not used: its
synchronous API runs an asyncio loop per call (about 1 ms a query).
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

from pyroute2.netlink import NETLINK_NETFILTER, NLM_F_CREATE
from pyroute2.netlink.nfnetlink import (
    NFNL_SUBSYS_CTNETLINK,
    NFNLGRP_CONNTRACK_DESTROY,
    NFNLGRP_CONNTRACK_NEW,
    NFNLGRP_CONNTRACK_UPDATE,
)
from pyroute2.netlink.nfnetlink.nfctsocket import (
    IPCTNL_MSG_CT_DELETE,
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
CT_GROUPS = (1 << (NFNLGRP_CONNTRACK_NEW - 1) | 1 << (NFNLGRP_CONNTRACK_UPDATE - 1)
             | 1 << (NFNLGRP_CONNTRACK_DESTROY - 1))
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


_WIRE_ID = struct.Struct("!BHH16s16s")  # addresses NUL-padded to 16 bytes


def wire_id(proto: int, sport: int, dport: int, src: bytes, dst: bytes) -> bytes:
    """Compact identity of a wire tuple, the same from a flow key, a
    conntrack tuple or a raw ctnetlink tuple."""
    return _WIRE_ID.pack(proto, sport, dport, src, dst)


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


class CtEvents:
    """Non-blocking subscription to conntrack NEW/UPDATE/DESTROY events."""

    def __init__(self, rcvbuf: int = 4 << 20) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        # FORCE (root) past net.core.rmem_max, which is 208 KiB on a stock
        # kernel: a burst of new connections overflows that in milliseconds.
        for opt in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, opt, rcvbuf)
                break
            except OSError:
                continue
        self.sock.bind((0, CT_GROUPS))
        self.sock.setblocking(False)
        self.overflows = 0
        self._filter: ctypes.Array[ctypes.c_char] | None = None
        self._addresses = Addresses()

    def fileno(self) -> int:
        return self.sock.fileno()

    def ignore_sender(self, portid: int) -> None:
        """Drop, in the kernel, the events caused by the agent's own updates
        (refreshes, the liberal flag): the kernel puts the updating socket's
        port id in the event's header, where packets' events carry 0. At
        100,000 offloaded flows the refreshes alone are thousands a second,
        each an UPDATE event that says nothing new, read and decoded for
        nothing, and taking room in the buffer that NEW events need."""
        prog = _drop_port_filter(portid)
        self._filter = ctypes.create_string_buffer(prog)  # kept: the kernel copies it, to be safe
        fprog = struct.pack("HL", len(prog) // 8, ctypes.addressof(self._filter))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)

    def read(self, budget: int = 256) -> list[CtEvent]:
        """Events queued now (at most ``budget`` datagrams). An overflow
        (ENOBUFS) is counted; the agent's sweep repairs what was missed."""
        out: list[CtEvent] = []
        for _ in range(budget):
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overflows += 1
                    continue
                raise
            out += events_of(data, self._addresses)
        return out

    def close(self) -> None:
        self.sock.close()


SO_ATTACH_FILTER, SO_RCVBUFFORCE = 26, 33  # asm-generic/socket.h
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_RET_K = 0x20, 0x15, 0x06  # classic BPF (linux/filter.h)


def _drop_port_filter(portid: int) -> bytes:
    """A classic BPF socket filter that drops datagrams whose first netlink
    header's nlmsg_pid is ``portid`` and keeps the rest whole. Events come
    one message to a datagram. A word load converts from network order;
    the header is in host order, so the constant is swapped to match."""
    want = struct.unpack("!I", struct.pack("=I", portid))[0]
    insns = [(_BPF_LD_W_ABS, 0, 0, 12),  # A = nlmsg_pid
             (_BPF_JEQ_K, 0, 1, want),  # ours: next, else skip one
             (_BPF_RET_K, 0, 0, 0),  # drop
             (_BPF_RET_K, 0, 0, 0xFFFFFFFF)]  # keep
    return b"".join(struct.pack("=HBBI", *i) for i in insns)


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


def _new_address(raw: bytes) -> IPAddress:
    return _Address4(raw) if len(raw) == 4 else _Address6(raw)


class Addresses:
    """Packed address -> its (immutable) ipaddress object, kept for the
    events: a router's events name the same hosts over and over, and
    building the four address objects of an event cost about as much as
    decoding the whole message. Bounded: emptied when full."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self.known: dict[bytes, IPAddress] = {}

    def __call__(self, raw: bytes) -> IPAddress:
        known = self.known
        got = known.get(raw)
        if got is None:
            if len(known) >= self.size:
                known.clear()
            got = known[raw] = _new_address(raw)
        return got


def _t5(raw: ctnetlink.Raw5 | None) -> Tuple5 | None:
    if raw is None or raw[0] not in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
        return None
    return Tuple5(raw[0], _new_address(raw[1]), _new_address(raw[2]), raw[3], raw[4])


def event_entry(msg: ctnetlink.Decoded) -> CtEntry | None:
    """The CtEntry of a decoded message (an event or a dumped entry), TCP/UDP only."""
    return _entry_from(msg)


def _entry_from(msg: ctnetlink.Decoded) -> CtEntry | None:
    orig, reply = _t5(msg.orig), _t5(msg.reply)
    if orig is None or reply is None:
        return None
    return CtEntry(orig, reply, msg.status, msg.tcp_state, msg.zone, msg.helper, msg.timeout,
                   msg.mark)


_BE32 = struct.Struct("!I")
_BE16 = struct.Struct("!H")
_L4 = (socket.IPPROTO_TCP, socket.IPPROTO_UDP)


def events_of(data: bytes, addresses: Addresses | None = None) -> list[CtEvent]:
    """The events in one datagram from the event socket, each message's
    attributes walked once into its CtEvent: the generic decode
    (ctnetlink.decode, then event_entry and two raw_wire_id) gives the same
    events (tests/unit/test_ct_event_decode.py) at a higher cost, and the
    agent decodes two or three events per new flow."""
    out: list[CtEvent] = []
    addresses = addresses or Addresses()
    pos, size = 0, len(data)
    while pos + 16 <= size:
        length, kind, flags, _seq, _pid = ctnetlink.NLMSGHDR.unpack_from(data, pos)
        if length < 16 or pos + length > size:
            break
        if kind >> 8 == NFNL_SUBSYS_CTNETLINK:
            event = _event(data, pos + 20, pos + length, kind & 0xFF, flags, addresses)
            if event is not None:
                out.append(event)
        pos += (length + 3) & ~3
    return out


_SCALARS = {ctnetlink.CTA_STATUS: (0, _BE32), ctnetlink.CTA_TIMEOUT: (1, _BE32),
            ctnetlink.CTA_ZONE: (2, _BE16), ctnetlink.CTA_MARK: (3, _BE32)}
_new_tuple = tuple.__new__  # a named tuple without its Python-level __new__: half the cost


def _event(data: bytes, pos: int, end: int, msg_type: int, flags: int,
           addresses: Addresses) -> CtEvent | None:
    orig = reply = None
    scalars = [0, 0, 0, 0]  # status, timeout, zone, mark
    tcp_state, helper = -1, False
    while pos + 4 <= end:
        length, kind = ctnetlink.NLA.unpack_from(data, pos)
        if length < 4 or pos + length > end:
            break
        kind &= ctnetlink.NLA_TYPE_MASK
        scalar = _SCALARS.get(kind)
        if scalar is not None:
            if length >= 4 + scalar[1].size:
                scalars[scalar[0]] = scalar[1].unpack_from(data, pos + 4)[0]
        elif kind == ctnetlink.CTA_TUPLE_ORIG:
            orig = ctnetlink.tuple_at(data, (pos + 4, pos + length))
        elif kind == ctnetlink.CTA_TUPLE_REPLY:
            reply = ctnetlink.tuple_at(data, (pos + 4, pos + length))
        elif kind == ctnetlink.CTA_PROTOINFO:
            tcp_state = ctnetlink.tcp_state(data, (pos + 4, pos + length))
        elif kind == ctnetlink.CTA_HELP:
            helper = True
        pos += (length + 3) & ~3
    if orig is None or reply is None:
        return None
    ids = (_WIRE_ID.pack(orig[0], orig[3], orig[4], orig[1], orig[2]),
           _WIRE_ID.pack(reply[0], reply[3], reply[4], reply[1], reply[2]))
    if msg_type == IPCTNL_MSG_CT_DELETE:
        return CtEvent("destroy", None, *ids)
    if orig[0] not in _L4 or reply[0] not in _L4:
        return None
    known = addresses.known.get
    entry = _new_tuple(CtEntry, (
        _new_tuple(Tuple5, (orig[0], known(orig[1]) or addresses(orig[1]),
                            known(orig[2]) or addresses(orig[2]), orig[3], orig[4])),
        _new_tuple(Tuple5, (reply[0], known(reply[1]) or addresses(reply[1]),
                            known(reply[2]) or addresses(reply[2]), reply[3], reply[4])),
        scalars[0], tcp_state, scalars[2], helper, scalars[1], scalars[3]))
    return CtEvent("new" if flags & NLM_F_CREATE else "update", entry, *ids)


def nat_target(entry: CtEntry, reply: bool) -> Tuple5:
    """How a packet of this direction looks after NAT: the other direction's
    tuple reversed."""
    other = entry.orig if reply else entry.reply
    return Tuple5(other.proto, other.dst, other.src, other.dport, other.sport)
