"""A reconcile after an event overflow hands on the dumped entries of
connections with a tuple waiting for its NEW event (offloader/reconcile.py):
the overflow lost those events, and without this the sweep's stuck queries
(STUCK_BUDGET a second) were all that found them. The dump's socket is a
fake that hands out datagrams the kernel could have sent; the decode, the
waiting state and the matching run for real."""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterator

from offloader import ctnetlink as c
from offloader.conntrack import CtEvent, Tuple5
from offloader.datapath import FlowKey
from offloader.flowstate import FlowState, Seen, tuple_id
from offloader.reconcile import Reconciler, Shown
from offloader.records import Records
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


def flow_key(sport: int, ifindex: int = 3) -> bytes:
    """The raw key of the original direction of the connection from ``sport``."""
    return FlowKey(ifindex=ifindex, family=socket.AF_INET, proto=17, src=A("198.18.1.2"),
                   dst=A("198.19.1.2"), sport=sport, dport=7000).pack()


class FlowMap:
    """The flow map's batched read: its keys two to a batch."""

    def __init__(self, keys: list[bytes]) -> None:
        self.keys = keys

    def batches(self) -> Iterator[tuple[bytes, bytes, int]]:
        for i in range(0, len(self.keys), 2):
            chunk = self.keys[i : i + 2]
            yield b"".join(chunk), b"", len(chunk)


def reconciler(datagrams: list[bytes], state: FlowState,
               found: list[CtEvent], flows: FlowMap | None = None) -> Reconciler:
    r = Reconciler.__new__(Reconciler)  # no netlink socket: the fake's datagrams instead
    r.flows, r.rec = flows or FlowMap([]), Records()
    r.shown = Shown(r.rec.wire(k) for k in r.flows.keys)
    r.sock = Sock(datagrams)  # type: ignore[assignment]
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


def test_the_flows_whose_connection_the_dump_does_not_show_are_gone() -> None:
    """Of the snapshot's flows, those still in the map and not dumped go; a
    flow of a dumped connection stays whichever ingress it came in on, and
    one added after the snapshot is not judged."""
    kept, twin, gone = flow_key(10000), flow_key(10000, ifindex=4), flow_key(10001)
    flows = FlowMap([kept, twin, gone, flow_key(10002)])
    r = reconciler([dumped(10000), done(1)], FlowState(max_waiting=1), [], flows)
    flows.keys = [kept, twin, gone, flow_key(10003)]  # 10002 left, 10003 came meanwhile
    result = None
    while result is None and r.running:
        result = r.read()
    assert result == [gone]


def test_shown_tells_shown_unshown_and_unknown_directions_apart() -> None:
    wires = [key_id(p) for p in range(20000, 23000)]
    shown = Shown(wires + wires[:10])  # grown from 1,024 slots; ten directions twice
    assert shown.used == 3010 and len(shown.slots) >= 2 * shown.used
    for w in wires[::2]:
        shown.show(w)
    assert [shown.state(w) for w in wires[:4]] == [True, False, True, False]
    assert shown.state(wires[1]) is False  # both of its flows still unshown
    shown.show(wires[1])
    assert shown.state(wires[1]) is True
    assert shown.state(key_id(30000)) is None
