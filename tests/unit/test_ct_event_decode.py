"""A conntrack event read from the socket: the entry and both wire ids,
with the address objects shared between events (offloader/ctevents.py
CtEvents.read, events_of, Addresses). The socket is a fake that hands out
datagrams the kernel could have sent; the decode runs for real."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offloader import ctnetlink as c
from offloader.conntrack import CtEntry, CtEvent, event_entry, raw_wire_id
from offloader.ctevents import Addresses, CtEvents, Layouts, events_of
from offloader.flowstate import tuple_id

A = ipaddress.ip_address


def ct_message(sport: int, flags: int, seq: int = 0) -> bytes:
    """An IPCTNL_MSG_CT_NEW message of a masqueraded UDP connection from
    198.18.1.2:``sport`` to 198.19.1.2:7000, as the kernel sends it."""
    orig = (17, A("198.18.1.2").packed, A("198.19.1.2").packed, sport, 7000)
    reply = (17, A("198.19.1.2").packed, A("198.19.0.1").packed, 7000, sport)
    payload = (struct.pack("=BBH", 2, 0, 0) + c.encode_tuple(c.CTA_TUPLE_ORIG, orig)
               + c.encode_tuple(c.CTA_TUPLE_REPLY, reply)
               + c._attr(c.CTA_STATUS, struct.pack("!I", 0x8)))
    return struct.pack("=IHHII", 16 + len(payload), 1 << 8, flags, seq, 0) + payload


def new_event(sport: int) -> bytes:
    return ct_message(sport, 0x400)  # NLM_F_CREATE


class Sock:
    def __init__(self, datagrams: list[bytes]) -> None:
        self.datagrams = datagrams

    def recv(self, n: int) -> bytes:
        if not self.datagrams:
            raise BlockingIOError
        return self.datagrams.pop(0)


def events(datagrams: list[bytes], destroys: list[bytes] | None = None) -> CtEvents:
    ev = CtEvents.__new__(CtEvents)  # no netlink socket: the fake's datagrams instead
    ev.sock, ev.overflows = Sock(datagrams), 0  # type: ignore[assignment]
    ev.destroy_sock = Sock(destroys or [])  # type: ignore[assignment]
    ev.drained = True
    ev._addresses, ev._layouts = Addresses(), Layouts()
    return ev


def destroy_event(sport: int) -> bytes:
    msg = ct_message(sport, 0)
    return msg[:4] + struct.pack("=H", (1 << 8) | 2) + msg[6:]  # IPCTNL_MSG_CT_DELETE


def test_destroys_are_read_after_every_new_event_queued() -> None:
    """DESTROY events come on a socket of their own (a burst of expiring
    connections must not queue ahead of a NEW event); they are handed over
    only once the NEW and UPDATE socket is empty, after what it still held,
    so no connection's NEW comes after its DESTROY."""
    ev = events([new_event(20000 + i) for i in range(300)], [destroy_event(20000)])
    first = ev.read_destroys(budget=256)  # 256 of the NEW events, the socket not yet empty
    assert [e.kind for e in first] == ["new"] * 256 and not ev.drained
    second = ev.read_destroys(budget=256)  # the other 44, then the DESTROY
    assert [e.kind for e in second] == ["new"] * 44 + ["destroy"]
    assert second[-1].orig_id == first[0].orig_id  # the connection of port 20000
    assert ev.read_destroys() == [] and ev.read() == []


def test_an_event_carries_its_entry_and_both_wire_ids() -> None:
    (a, b) = events([new_event(10000), new_event(10001)]).read()
    assert a.kind == "new" and a.entry is not None and b.entry is not None
    assert a.entry.orig.src == A("198.18.1.2") and a.entry.reply.dst == A("198.19.0.1")
    assert (a.orig_id, a.reply_id) == (tuple_id(a.entry.orig), tuple_id(a.entry.reply))
    assert a.orig_id != b.orig_id
    assert a.entry.orig.src is b.entry.orig.src  # one object for the host


def test_the_address_objects_kept_are_bounded() -> None:
    addr = Addresses(size=4)
    first = addr(A("198.18.0.1").packed)
    assert addr(A("198.18.0.1").packed) is first
    for i in range(2, 10):
        addr(A(f"198.18.0.{i}").packed)
    assert len(addr.known) <= 4
    assert addr(A("2001:db8::1").packed) == A("2001:db8::1")



def test_an_event_address_is_the_ipaddress_one_in_every_use() -> None:
    """The kept address objects hash once (conntrack.hashed_address); as keys,
    in comparisons and in what a user reads they are ipaddress's own."""
    addr = Addresses()
    for text in ("198.18.0.1", "2001:db8::1"):
        plain, kept = A(text), addr(A(text).packed)
        assert kept == plain and plain == kept and hash(kept) == hash(plain)
        assert {plain: 1}[kept] == 1 and {kept: 2}[plain] == 2
        assert repr(kept) == repr(plain) and str(kept) == text
        assert kept.packed == plain.packed and kept in ipaddress.ip_network(plain)
    a, b = addr(A("198.18.0.1").packed), addr(A("198.18.0.2").packed)
    assert a < b and hash(a) != hash(b)

# -- the one-walk event decode against the generic one -------------------------------------------

def generic_events(data: bytes) -> list[CtEvent]:
    """What the event socket's datagram means by the generic codec: every
    message decoded (ctnetlink.decode), its entry built (event_entry) and its
    tuples' wire ids (raw_wire_id), as CtEvents.read did before events_of."""
    out: list[CtEvent] = []
    for msg in c.decode(data):
        if not isinstance(msg, c.Decoded) or msg.orig is None or msg.reply is None:
            continue
        ids = (raw_wire_id(msg.orig), raw_wire_id(msg.reply))
        if msg.msg_type == 2:  # IPCTNL_MSG_CT_DELETE
            out.append(CtEvent("destroy", None, *ids))
            continue
        entry = event_entry(msg)
        if entry is not None:
            out.append(CtEvent("new" if msg.flags & 0x400 else "update", entry, *ids))
    return out


def icmp_tuple(kind: int, src: bytes, dst: bytes, ident: int) -> bytes:
    """An ICMP tuple as the kernel writes it: id, type and code, no ports."""
    v6 = len(src) == 16
    ip = c._attr(3 if v6 else 1, src) + c._attr(4 if v6 else 2, dst)
    l4 = (c._attr(c.CTA_PROTO_NUM, bytes((58 if v6 else 1,))) + c._attr(4, struct.pack("!H", ident))
          + c._attr(5, b"\x08") + c._attr(6, b"\x00"))
    return c._attr(kind, c._attr(c.CTA_TUPLE_IP, ip, True) + c._attr(c.CTA_TUPLE_PROTO, l4, True),
                   True)


@st.composite
def ct_tuples(draw: st.DrawFn, kind: int, v6: bool) -> bytes:
    n = 16 if v6 else 4
    src, dst = draw(st.binary(min_size=n, max_size=n)), draw(st.binary(min_size=n, max_size=n))
    proto = draw(st.sampled_from([6, 17, 132, 1]))
    if proto == 1:
        return icmp_tuple(kind, src, dst, draw(st.integers(0, 65535)))
    raw = c.encode_tuple(kind, (proto, src, dst, draw(st.integers(0, 65535)),
                                draw(st.integers(0, 65535))))
    if draw(st.booleans()):  # CTA_TUPLE_ZONE inside: a layout other than the usual one
        inner = raw[4:] + c._attr(3, struct.pack("!H", draw(st.integers(0, 65535))))
        raw = struct.pack("=HH", 4 + len(inner), kind | 0x8000) + inner
    return raw


@st.composite
def ct_messages(draw: st.DrawFn) -> bytes:
    v6 = draw(st.booleans())
    attrs = []
    for kind in (c.CTA_TUPLE_ORIG, c.CTA_TUPLE_REPLY):
        if draw(st.integers(0, 9)):  # now and then a message without one of them
            attrs.append(draw(ct_tuples(kind, v6)))
    u32 = st.integers(0, 2**32 - 1)
    for kind, fmt, values in ((c.CTA_STATUS, "!I", u32), (c.CTA_TIMEOUT, "!I", u32),
                              (c.CTA_MARK, "!I", u32), (c.CTA_ZONE, "!H", st.integers(0, 65535)),
                              (12, "!I", u32)):  # CTA_ID: one the agent does not read
        if draw(st.booleans()):
            attrs.append(c._attr(kind, struct.pack(fmt, draw(values))))
    if draw(st.booleans()):
        state = c._attr(c.CTA_PROTOINFO_TCP_STATE, bytes((draw(st.integers(0, 9)),)))
        flags = c._attr(c.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, b"\x01\x01")
        tcp = b"".join(draw(st.permutations([flags, state])))  # one length, the state anywhere
        attrs.append(c._attr(c.CTA_PROTOINFO, c._attr(c.CTA_PROTOINFO_TCP, tcp, True), True))
    if draw(st.booleans()):
        attrs.append(c._attr(c.CTA_HELP, c._attr(1, b"ftp\0"), True))
    attrs = draw(st.permutations(attrs))
    family = 10 if v6 else 2
    payload = struct.pack("=BBH", family, 0, 0) + b"".join(attrs)
    msg_type = draw(st.sampled_from([0, 2]))  # IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_DELETE
    flags = draw(st.sampled_from([0, 0x400, 0x600]))  # NLM_F_CREATE, | NLM_F_EXCL
    return struct.pack("=IHHII", 16 + len(payload), (1 << 8) | msg_type, flags, 0, 0) + payload


SEEN = Layouts(size=8)  # shared by the examples: layouts learnt from others, and emptied when full


@settings(max_examples=600, deadline=None)
@given(st.lists(ct_messages(), min_size=1, max_size=3))
def test_the_event_decode_is_the_generic_decode(messages: list[bytes]) -> None:
    """IPv4 and IPv6; TCP, UDP, SCTP and ICMP; zone, mark, TCP state and a
    helper or not; the usual tuple layout and another; attributes in any
    order; one message or several in a datagram. Walked the first time and
    read by a learnt layout the second (the layouts are shared between
    examples, so a message also meets others' layouts of its length)."""
    data = b"".join(messages)
    want = generic_events(data)
    first = events_of(data, layouts=SEEN)
    assert first == want and len(first) <= len(messages)
    assert events_of(data, layouts=SEEN) == want


def with_attr(msg: bytes, attr: bytes) -> bytes:
    return struct.pack("=I", len(msg) + len(attr)) + msg[4:] + attr


def tcp_info(state: int, state_first: bool) -> bytes:
    parts = [c._attr(c.CTA_PROTOINFO_TCP_STATE, bytes((state,))),
             c._attr(c.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, b"\x01\x01")]
    tcp = b"".join(parts if state_first else parts[::-1])
    return c._attr(c.CTA_PROTOINFO, c._attr(c.CTA_PROTOINFO_TCP, tcp, True), True)


MARK_7 = c._attr(c.CTA_MARK, struct.pack("!I", 7))
ZONE_3 = c._attr(c.CTA_ZONE, struct.pack("!H", 3))


@pytest.mark.parametrize(("one", "other", "values"), [
    (MARK_7, ZONE_3, lambda e: (e.mark, e.zone)),  # both 8-byte attributes
    (tcp_info(3, True), tcp_info(5, False), lambda e: e.tcp_state),  # the state elsewhere in its nest
], ids=["mark-or-zone", "tcp-state-first-or-last"])
def test_a_message_is_read_by_a_learnt_layout_only_if_it_has_it(
        one: bytes, other: bytes, values: Callable[[CtEntry], object]) -> None:
    """Two messages of one length and type in two layouts: each is read
    with its own values, the second time by its own layout."""
    layouts = Layouts()
    base = ct_message(10000, 0x400)
    want = [values(e.entry) for e in (generic_events(with_attr(base, a))[0] for a in (one, other))]
    assert want[0] != want[1]
    for _ in range(2):
        got = [events_of(with_attr(base, a), layouts=layouts)[0].entry for a in (one, other)]
        assert [values(e) for e in got if e is not None] == want
    assert [len(v) for v in layouts.known.values()] == [2]


def test_a_message_without_a_layout_is_walked_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """An ICMP event has no layout to learn (its tuples are not the usual
    ones): it is walked, and learning is tried on the first and every
    RETRY-th message of its length and type only. A message with a layout
    is read by the layout it teaches, not walked as well."""
    from offloader import ctevents

    tried, walks = [], []
    learnt, event = ctevents._learnt, ctevents._event
    monkeypatch.setattr(ctevents, "_learnt", lambda *a: tried.append(1) or learnt(*a))
    monkeypatch.setattr(ctevents, "_event", lambda *a: walks.append(1) or event(*a))
    src, dst = A("198.18.1.2").packed, A("198.19.1.2").packed
    payload = (struct.pack("=BBH", 2, 0, 0) + icmp_tuple(c.CTA_TUPLE_ORIG, src, dst, 9)
               + icmp_tuple(c.CTA_TUPLE_REPLY, dst, src, 9)
               + c._attr(c.CTA_STATUS, struct.pack("!I", 0x8)))
    icmp = struct.pack("=IHHII", 16 + len(payload), 1 << 8, 0x400, 0, 0) + payload
    layouts = Layouts()
    for _ in range(100):
        assert events_of(icmp, layouts=layouts) == generic_events(icmp) == []  # not L4: no event
    assert (len(tried), len(walks)) == (2, 100)  # the 1st and the 65th
    assert layouts.known == {}
    tried.clear(), walks.clear()
    udp = new_event(10000)
    for _ in range(3):
        assert events_of(udp, layouts=layouts) == generic_events(udp)
    assert (len(tried), len(walks)) == (1, 0)


def test_the_layouts_kept_are_bounded() -> None:
    layouts = Layouts(size=2)
    for extra in range(5):
        msg = ct_message(10000, 0x400) + c._attr(12, bytes(4 * extra))
        events_of(struct.pack("=I", len(msg)) + msg[4:], layouts=layouts)
        assert len(layouts.known) <= 2
    assert all(len(v) <= Layouts.PER_KIND for v in layouts.known.values())


def test_the_one_walk_decode_reads_what_the_kernel_writes() -> None:
    """Not only equal to the generic decode: the values themselves."""
    (ev,) = events_of(ct_message(10000, 0x400))
    assert ev.kind == "new" and ev.entry is not None
    assert ev.entry.orig == (17, A("198.18.1.2"), A("198.19.1.2"), 10000, 7000)
    assert ev.entry.reply == (17, A("198.19.1.2"), A("198.19.0.1"), 7000, 10000)
    assert ev.entry.status == 0x8 and ev.entry.zone == 0 and ev.entry.tcp_state == -1
    assert ev.orig_id == tuple_id(ev.entry.orig) and ev.reply_id == tuple_id(ev.entry.reply)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 200), st.binary(min_size=1, max_size=6))
def test_damaged_events_never_raise(garbage: bytes, cut: int, patch: bytes) -> None:
    """Also against the layout of the undamaged message, learnt first."""
    list(events_of(garbage))
    layouts = Layouts()
    msg = bytearray(ct_message(10000, 0x400))
    events_of(bytes(msg), layouts=layouts)
    at = cut % len(msg)
    msg[at : at + len(patch)] = patch
    damaged = bytes(msg[: max(16, len(msg) - cut // 2)])
    assert events_of(damaged, layouts=layouts) == generic_events(damaged)


def test_an_empty_attribute_at_the_end_of_a_datagram_is_ignored() -> None:
    """A status attribute without its four bytes, last in the datagram:
    nothing is read past the end, and the earlier status stands."""
    msg = ct_message(10000, 0x400)
    data = struct.pack("=I", len(msg) + 4) + msg[4:] + struct.pack("=HH", 4, c.CTA_STATUS)
    (ev,) = events_of(data)
    assert ev.entry is not None and ev.entry.status == 0x8
