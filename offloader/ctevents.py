"""Conntrack's events: the subscription and the decode of what it reads.

The agent reads an event or two for every new connection (NEW, then
DESTROY when it ends), so the decode is the agent's per-flow work more than
anything else it does: messages are read by the layouts of earlier ones
(Layouts) and their hosts' address objects are shared (Addresses). What an
event means is conntrack.py's (CtEvent, CtEntry); the codec is ctnetlink.py.
"""

from __future__ import annotations

import ctypes
import errno
import operator
import socket
import struct
from typing import Any, NamedTuple

from pyroute2.netlink import NETLINK_NETFILTER, NLM_F_CREATE
from pyroute2.netlink.nfnetlink import (
    NFNL_SUBSYS_CTNETLINK,
    NFNLGRP_CONNTRACK_DESTROY,
    NFNLGRP_CONNTRACK_NEW,
    NFNLGRP_CONNTRACK_UPDATE,
)
from pyroute2.netlink.nfnetlink.nfctsocket import IPCTNL_MSG_CT_DELETE

from . import ctnetlink
from .conntrack import WIRE_ID, CtEntry, CtEvent, IPAddress, Tuple5, hashed_address

# Constants from their owner: pyroute2's netlink modules (uapi values).
CT_GROUPS = 1 << (NFNLGRP_CONNTRACK_NEW - 1) | 1 << (NFNLGRP_CONNTRACK_UPDATE - 1)
CT_DESTROY_GROUP = 1 << (NFNLGRP_CONNTRACK_DESTROY - 1)


class CtEvents:
    """Non-blocking subscriptions to conntrack's events: NEW and UPDATE on
    one socket, DESTROY on another. Conntrack's garbage collector reaps
    expired connections in bursts of thousands, and each sends a DESTROY;
    on one socket a new connection's NEW event queued behind such a burst
    waited until every DESTROY ahead of it was read (at 10,000 new flows a
    second, the p99 setup went from about 1 ms to 3-17 ms while an earlier
    burst of flows expired, docs/performance.md). The agent reads the
    DESTROY socket only once the other is empty (``read_destroys``)."""

    def __init__(self, rcvbuf: int = 4 << 20) -> None:
        self.sock = _subscribed(CT_GROUPS, rcvbuf)
        try:
            self.destroy_sock = _subscribed(CT_DESTROY_GROUP, rcvbuf)
        except OSError:
            self.sock.close()
            raise
        self.overflows = 0
        self.drained = True  # the last read found the NEW and UPDATE socket empty
        self._filter: ctypes.Array[ctypes.c_char] | None = None
        self._addresses = Addresses()
        self._layouts = Layouts()

    def fileno(self) -> int:
        return self.sock.fileno()

    def destroy_fileno(self) -> int:
        return self.destroy_sock.fileno()

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
        for sock in (self.sock, self.destroy_sock):
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)

    def read(self, budget: int = 256) -> list[CtEvent]:
        """NEW and UPDATE events queued now (at most ``budget`` datagrams).
        An overflow (ENOBUFS) is counted; the agent's sweep repairs what was
        missed."""
        out, self.drained = self._read(self.sock, budget)
        return out

    def read_destroys(self, budget: int = 256) -> list[CtEvent]:
        """DESTROY events queued now, after the NEW and UPDATE events still
        queued (read first, returned first; none when more than ``budget``
        datagrams of them were). A connection's NEW is queued on the other
        socket before its DESTROY is queued on this one, so reading this
        one only once the other was found empty hands no NEW over after its
        connection's DESTROY."""
        out = self.read(budget)
        if self.drained:
            out += self._read(self.destroy_sock, budget)[0]
        return out

    def _read(self, sock: socket.socket, budget: int) -> tuple[list[CtEvent], bool]:
        """The events of at most ``budget`` datagrams, and whether ``sock`` is empty."""
        out: list[CtEvent] = []
        for _ in range(budget):
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                return out, True
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overflows += 1
                    continue
                raise
            out += events_of(data, self._addresses, self._layouts)
        return out, False

    def close(self) -> None:
        self.sock.close()
        self.destroy_sock.close()


def _subscribed(groups: int, rcvbuf: int) -> socket.socket:
    """A non-blocking NETLINK_NETFILTER socket bound to ``groups``."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        # FORCE (root) past net.core.rmem_max, which is 208 KiB on a stock
        # kernel: a burst of new connections overflows that in milliseconds.
        for opt in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, rcvbuf)
                break
            except OSError:
                continue
        sock.bind((0, groups))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


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
            got = known[raw] = hashed_address(raw)
        return got


_BE32 = struct.Struct("!I")
_BE16 = struct.Struct("!H")
_L4 = (socket.IPPROTO_TCP, socket.IPPROTO_UDP)


def events_of(data: bytes, addresses: Addresses | None = None,
              layouts: Layouts | None = None) -> list[CtEvent]:
    """The events in one datagram from the event socket. A message is read
    by the layout of an earlier one of its length and type when its
    attribute headers are the same bytes (Layouts), else its attributes
    are walked once (and its layout learnt). Either gives what the generic
    decode (ctnetlink.decode, then event_entry and two raw_wire_id) gives
    (tests/unit/test_ct_event_decode.py) at a lower cost: the agent decodes
    an event or two per new flow."""
    out: list[CtEvent] = []
    addresses = addresses or Addresses()
    layouts = layouts if layouts is not None else Layouts()
    pos, size = 0, len(data)
    while pos + 16 <= size:
        length, kind, flags, _seq, _pid = ctnetlink.NLMSGHDR.unpack_from(data, pos)
        if length < 16 or pos + length > size:
            break
        if kind >> 8 == NFNL_SUBSYS_CTNETLINK:
            event = layouts.read(data, pos, length, kind & 0xFF, flags, addresses)
            if event is not None:
                out.append(event)
        pos += (length + 3) & ~3
    return out


_SCALARS = {ctnetlink.CTA_STATUS: (0, _BE32), ctnetlink.CTA_TIMEOUT: (1, _BE32),
            ctnetlink.CTA_ZONE: (2, _BE16), ctnetlink.CTA_MARK: (3, _BE32)}
_new_tuple = tuple.__new__  # a named tuple without its Python-level __new__: half the cost
# What an event is made of, in this order: the original tuple (proto, src,
# dst, sport, dport), the reply tuple, status, timeout, zone, mark, TCP state.
_VALUES = 15
_ABSENT = (0, -1)  # the values of an absent scalar and of an absent TCP state


def _event(data: bytes, pos: int, end: int, msg_type: int, flags: int,
           addresses: Addresses) -> CtEvent | None:
    """The event of the message whose attributes are ``data[pos:end]``, walked."""
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
    return _made((*orig, *reply, *scalars, tcp_state), msg_type, flags, helper, addresses)


def _made(v: tuple[Any, ...], msg_type: int, flags: int, helper: bool,
          addresses: Addresses) -> CtEvent | None:
    """The event of a message's _VALUES values."""
    ids = (WIRE_ID.pack(v[0], v[3], v[4], v[1], v[2]), WIRE_ID.pack(v[5], v[8], v[9], v[6], v[7]))
    if msg_type == IPCTNL_MSG_CT_DELETE:
        return _new_tuple(CtEvent, ("destroy", None, *ids))
    if v[0] not in _L4 or v[5] not in _L4:
        return None
    known = addresses.known.get
    entry = _new_tuple(CtEntry, (
        _new_tuple(Tuple5, (v[0], known(v[1]) or addresses(v[1]), known(v[2]) or addresses(v[2]),
                            v[3], v[4])),
        _new_tuple(Tuple5, (v[5], known(v[6]) or addresses(v[6]), known(v[7]) or addresses(v[7]),
                            v[8], v[9])),
        v[10], v[14], v[12], helper, v[11], v[13]))
    return _new_tuple(CtEvent, ("new" if flags & NLM_F_CREATE else "update", entry, *ids))


class _Layout(NamedTuple):
    """Where one message layout has what an event is made of: one struct
    reads every attribute header _event's walk reads and every value it
    keeps; the message has this layout if the headers are these bytes."""

    fields: struct.Struct
    heads: operator.itemgetter[Any]  # the headers among the fields
    expect: tuple[bytes, ...]
    values: operator.itemgetter[Any]  # the _VALUES values among the fields and _ABSENT
    helper: bool


class Layouts:
    """The layouts of the messages seen, by length and type, a few each.
    A router's events come in a handful of layouts (per family, protocol
    and kind, each kernel's own attribute order), so nearly every message
    is read in one struct unpack, not walked attribute by attribute. A
    message is walked once: its layout, when it has one, is learnt and
    read; a length and type that had none (ICMP tuples, a zone inside a
    tuple) is walked by _event alone, and learning is tried again only
    every RETRY-th such message. Bounded: emptied when full."""

    PER_KIND = 4
    RETRY = 64

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self.known: dict[tuple[int, int], list[_Layout]] = {}
        self.walked: dict[tuple[int, int], int] = {}  # unlearnt messages of a kind, in a row

    def read(self, data: bytes, pos: int, length: int, msg_type: int, flags: int,
             addresses: Addresses) -> CtEvent | None:
        """The event of the message at ``data[pos:pos+length]``."""
        kind = (length, msg_type)
        known = self.known.get(kind)
        if known is not None:
            for lay in known:
                got = lay.fields.unpack_from(data, pos)
                if lay.heads(got) == lay.expect:
                    return _made(lay.values(got + _ABSENT), msg_type, flags, lay.helper, addresses)
        walked = self.walked.get(kind, 0)
        if walked % self.RETRY == 0:
            new = _learnt(data, pos, pos + length)
            if new is not None:
                self._keep(kind, known, new)
                got = new.fields.unpack_from(data, pos)
                return _made(new.values(got + _ABSENT), msg_type, flags, new.helper, addresses)
        if walked == 0 and len(self.walked) >= self.size:
            self.walked.clear()
        self.walked[kind] = walked + 1
        return _event(data, pos + 20, pos + length, msg_type, flags, addresses)

    def _keep(self, kind: tuple[int, int], known: list[_Layout] | None, lay: _Layout) -> None:
        self.walked.pop(kind, None)
        if known is None:
            if len(self.known) >= self.size:
                self.known.clear()
            known = self.known[kind] = []
        if len(known) >= self.PER_KIND:
            del known[0]
        known.append(lay)


def _learnt(data: bytes, start: int, end: int) -> _Layout | None:
    """The layout of the message ``data[start:end]``, found by the walk
    _event makes; None when a tuple is missing or not in the usual layout
    (tuple_at walks those: read by _event), found at the first such tuple."""
    heads: list[ctnetlink.Field] = []
    values: list[ctnetlink.Field | None] = [None] * _VALUES
    helper, tuples = False, [False, False]
    pos = start + 20
    while pos + 4 <= end:
        heads.append((pos, "4s"))
        length, kind = ctnetlink.NLA.unpack_from(data, pos)
        if length < 4 or pos + length > end:
            break
        kind &= ctnetlink.NLA_TYPE_MASK
        span = (pos + 4, pos + length)
        scalar = _SCALARS.get(kind)
        if scalar is not None:
            if length >= 4 + scalar[1].size:
                values[10 + scalar[0]] = (pos + 4, scalar[1].format[-1])
        elif kind in (ctnetlink.CTA_TUPLE_ORIG, ctnetlink.CTA_TUPLE_REPLY):
            reply = kind == ctnetlink.CTA_TUPLE_REPLY
            found = ctnetlink.tuple_fields(data, span)
            if found is None:
                return None
            tuples[reply] = True
            heads += found[0]
            values[5 * reply : 5 * reply + 5] = found[1]
        elif kind == ctnetlink.CTA_PROTOINFO:
            more, values[14] = ctnetlink.tcp_state_fields(data, span)
            heads += more
        elif kind == ctnetlink.CTA_HELP:
            helper = True
        pos += (length + 3) & ~3
    if not all(tuples):
        return None
    return _layout(start, data, heads, values, helper)


def _layout(start: int, data: bytes, heads: list[ctnetlink.Field],
            values: list[ctnetlink.Field | None], helper: bool) -> _Layout | None:
    """One struct over the headers and values found (offsets from ``start``)."""
    read = sorted({f for f in (*heads, *values) if f is not None})
    fmt, at = ["!"], start
    for offset, code in read:
        if offset < at:
            return None  # overlapping fields: no layout the kernel writes
        fmt.append(f"{offset - at}x{code}" if offset > at else code)
        at = offset + struct.calcsize(code)
    index = {f: i for i, f in enumerate(read)}
    fields = struct.Struct("".join(fmt))
    head_at = [index[f] for f in heads]
    got = fields.unpack_from(data, start)
    absent = [len(read) + (i == 14) for i in range(_VALUES)]
    return _Layout(fields, operator.itemgetter(*head_at), tuple(got[i] for i in head_at),
                   operator.itemgetter(*(index[f] if f is not None else absent[i]
                                         for i, f in enumerate(values))), helper)


