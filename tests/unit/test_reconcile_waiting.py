"""A reconcile after an event overflow hands on the dumped entries of
connections with a tuple waiting for its NEW event (offloader/reconcile.py):
the overflow lost those events, and without this the sweep's stuck queries
(STUCK_BUDGET a second) were all that found them. The dump's socket is a
fake that hands out datagrams the kernel could have sent; the decode, the
waiting state and the matching run for real."""

from __future__ import annotations

import ipaddress
import struct

from offloader import ctnetlink as c
from offloader.conntrack import CtEvent, Tuple5
from offloader.flowstate import FlowState, Seen, tuple_id
from offloader.reconcile import Reconciler
from tests.unit.test_ct_event_decode import Sock, ct_message

A = ipaddress.ip_address


def dumped(sport: int) -> bytes:
    """One entry of a conntrack dump (IPCTNL_MSG_CT_NEW, NLM_F_MULTI)."""
    return ct_message(sport, 0x2, seq=1)


def done(seq: int) -> bytes:
    return struct.pack("=IHHIIi", 20, c.NLMSG_DONE, 0x2, seq, 0, 0)


def key_id(sport: int) -> bytes:
    """The wire id of the original direction of the connection from ``sport``."""
    return tuple_id(Tuple5(17, A("198.18.1.2"), A("198.19.1.2"), sport, 7000))


def reconciler(datagrams: list[bytes], state: FlowState,
               found: list[CtEvent]) -> Reconciler:
    r = Reconciler.__new__(Reconciler)  # no netlink socket: the fake's datagrams instead
    r.by_wire, r.sock = {}, Sock(datagrams)  # type: ignore[assignment]
    r.families, r.seq, r.interrupted, r.running = [2], 1, False, True
    r.waits, r.found = state.waits, found.extend
    return r


def test_dumped_entries_of_waiting_connections_are_handed_on_as_new_events() -> None:
    state = FlowState(max_waiting=100, ident=lambda raw: raw)  # raw keys are wire ids here
    waiting = key_id(10001)
    assert state.seen(waiting, 0)[0] is Seen.NEW  # its ring record came, its NEW event not
    found: list[CtEvent] = []
    gone = None
    r = reconciler([dumped(10000) + dumped(10001) + dumped(10002), done(1)], state, found)
    while gone is None and r.running:
        gone = r.read()
    assert gone == []
    assert [e.orig_id for e in found] == [waiting]  # only the waiting one: the rest cost lookups
    (ev,) = found
    assert ev.kind == "new" and ev.entry is not None and ev.entry.orig.sport == 10001
    # What the agent does with it: the waiting key is settled by the entry.
    assert state.updated(ev.entry, ev.orig_id, ev.reply_id, new=True) == [(waiting, False)]


def test_nothing_is_handed_on_when_nothing_waits() -> None:
    state = FlowState(max_waiting=100, ident=lambda raw: raw)
    found: list[CtEvent] = []
    r = reconciler([dumped(10000), done(1)], state, found)
    while r.running:
        r.read()
    assert found == []
