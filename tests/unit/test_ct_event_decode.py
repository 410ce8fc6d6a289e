"""A conntrack event read from the socket: the entry and both wire ids,
with the address objects shared between events (offloader/conntrack.py
CtEvents.read, Addresses). The socket is a fake that hands out one
datagram the kernel could have sent; the decode runs for real."""

from __future__ import annotations

import ipaddress
import struct

from offloader import ctnetlink as c
from offloader.conntrack import Addresses, CtEvents
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


def events(datagrams: list[bytes]) -> CtEvents:
    ev = CtEvents.__new__(CtEvents)  # no netlink socket: the fake's datagrams instead
    ev.sock, ev.overflows, ev._addresses = Sock(datagrams), 0, Addresses()  # type: ignore[assignment]
    return ev


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
    assert len(addr._known) <= 4
    assert addr(A("2001:db8::1").packed) == A("2001:db8::1")
