"""Flow-state transitions: waiting, conntrack updates, destroy of either
direction, holds, the pending-map safety net, and the bounds."""

from __future__ import annotations

import ipaddress
import socket

from pyroute2.netlink.nfnetlink.nfctsocket import IPS_CONFIRMED, TCP_CONNTRACK_ESTABLISHED

from offloader.conntrack import CtEntry, Tuple5
from offloader.datapath import FlowKey
from offloader.flowstate import (
    DEAD_BEFORE_SWEEP,
    DECIDED_KEPT,
    RECENT_CT,
    RECHECK_AFTER_NS,
    STUCK_AFTER_NS,
    STUCK_BUDGET,
    FlowState,
    Generations,
    Seen,
    key_id,
    raw_key_id,
    tuple_id,
)
from offloader.records import Records

ip = ipaddress.ip_address
REC = Records()


def key(sport: int = 40000, ifindex: int = 2, *, reply: bool = False) -> bytes:
    """A raw key, as the ring buffer and the maps hold them."""
    if reply:
        return FlowKey(3, socket.AF_INET, 6, ip("198.19.2.2"), ip("198.19.0.1"), 443, sport).pack()
    return FlowKey(ifindex, socket.AF_INET, 6, ip("198.18.1.2"), ip("198.19.2.2"), sport,
                   443).pack()


def entry(sport: int = 40000, zone: int = 0) -> CtEntry:
    return CtEntry(Tuple5(6, ip("198.18.1.2"), ip("198.19.2.2"), sport, 443),
                   Tuple5(6, ip("198.19.2.2"), ip("198.19.0.1"), 443, sport),
                   IPS_CONFIRMED, TCP_CONNTRACK_ESTABLISHED, zone, False, 60)


def ids(e: CtEntry) -> tuple[bytes, bytes]:
    return tuple_id(e.orig), tuple_id(e.reply)


def test_first_report_waits_then_rechecks_after_a_while() -> None:
    fs = FlowState(ident=REC.wire, max_waiting=16)
    assert fs.seen(key(), 0) == (Seen.NEW, None)
    assert fs.is_waiting(key())
    assert fs.seen(key(), RECHECK_AFTER_NS - 1) == (Seen.NOTHING, None)
    assert fs.seen(key(), RECHECK_AFTER_NS) == (Seen.RECHECK, None)
    fs.decided(key(), RECHECK_AFTER_NS)
    assert not fs.is_waiting(key()) and fs.waiting_count() == 0


def test_a_record_sent_before_the_decision_is_stale() -> None:
    # The datapath reports a pending tuple again every 200 ms; reports queued
    # while the agent decided must not start the key waiting again (each would
    # cost a conntrack query and a second offload of the same tuple).
    fs = FlowState(ident=REC.wire, max_waiting=16)
    e = entry()
    fs.updated(e, *ids(e))
    assert fs.seen(key(), 100, stamp_ns=90) == (Seen.NEW, e)
    fs.decided(key(), 200)
    assert fs.seen(key(), 300, stamp_ns=150) == (Seen.NOTHING, None)
    assert fs.seen(key(), 300, stamp_ns=200) == (Seen.NOTHING, None)
    assert not fs.is_waiting(key())
    # sent after the decision (the flow was torn down since): a new report
    assert fs.seen(key(), 400, stamp_ns=350) == (Seen.NEW, e)
    assert fs.is_waiting(key())


def test_decision_times_are_bounded() -> None:
    fs = FlowState(ident=REC.wire, max_waiting=16)
    # At least the last DECIDED_KEPT are kept, never more than twice that.
    for sport in range(2 * DECIDED_KEPT + 10):
        fs.decided(key(sport=sport % 65536), 100)
    assert fs.seen(key(sport=0), 300, stamp_ns=50) == (Seen.NEW, None)  # forgotten: asks
    for sport in (DECIDED_KEPT + 10, 2 * DECIDED_KEPT + 9):
        assert fs.seen(key(sport=sport), 300, stamp_ns=50) == (Seen.NOTHING, None)


def test_generations_keep_the_last_size_keys_and_at_most_twice_that() -> None:
    g: Generations[int, int] = Generations(100)
    for i in range(1, 1000):
        g.set(i, i)
        assert len(g) <= 200
        assert all(g.get(j) == j for j in range(max(1, i - 99), i + 1))
    g.set(999, 5)  # set again: the newest value wins
    assert g.get(999) == 5
    g.pop(999)
    assert g.get(999) is None


def test_an_event_read_before_the_ring_record_is_used() -> None:
    fs = FlowState(ident=REC.wire, max_waiting=16)
    e = entry()
    assert fs.updated(e, *ids(e)) == []  # nothing waits yet
    assert fs.seen(key(), 0) == (Seen.NEW, e)


def test_update_settles_both_directions_and_remembers_the_zone() -> None:
    fs = FlowState(ident=REC.wire, max_waiting=16)
    e = entry(zone=7)
    fs.seen(key(), 0)
    fs.seen(key(reply=True), 0)
    got = fs.updated(e, *ids(e))
    assert sorted(got, key=lambda kr: kr[1]) == [(key(), False), (key(reply=True), True)]
    assert fs.zone(REC.wire(key())) == 7 and fs.zone(REC.wire(key(reply=True))) == 7


def test_destroy_of_either_direction_forgets_the_connection() -> None:
    fs = FlowState(ident=REC.wire, max_waiting=16)
    e = entry(zone=7)
    orig, reply = ids(e)
    fs.seen(key(), 0)
    fs.updated(e, orig, reply)
    assert fs.forget(orig, reply) is False
    assert not fs.is_waiting(key())
    assert fs.zone(orig) == 0 and fs.zone(reply) == 0
    assert fs.seen(key(), 1) == (Seen.NEW, None)  # the recent entry went too
    assert fs.take_dead() == {orig, reply}
    assert fs.take_dead() == set()


def test_closing_marks_dead_and_stops_waiting_but_keeps_the_zone() -> None:
    fs = FlowState(ident=REC.wire, max_waiting=16)
    e = entry(zone=3)
    orig, reply = ids(e)
    fs.updated(e, orig, reply)
    fs.seen(key(), 0)
    fs.closing(orig, reply)
    assert not fs.is_waiting(key())
    assert fs.take_dead() == {orig, reply}
    assert fs.zone(orig) == 3


def test_many_destroys_ask_for_an_early_sweep() -> None:
    fs = FlowState(ident=REC.wire, max_waiting=16)
    asked = [fs.forget(b"o%d" % i, b"r%d" % i) for i in range(DEAD_BEFORE_SWEEP // 2 + 1)]
    assert not any(asked[:-1]) and asked[-1]


def test_bounds() -> None:
    fs = FlowState(ident=REC.wire, max_waiting=4)
    for port in range(10):
        fs.seen(key(port), 0)
    assert fs.waiting_count() == 4
    assert fs.is_waiting(key(9)) and not fs.is_waiting(key(0))  # the oldest go first
    for port in range(RECENT_CT + 10):
        e = entry(port)
        fs.updated(e, *ids(e))
    assert fs.seen(key(RECENT_CT + 9, ifindex=5), 0)[1] is not None
    assert fs.seen(key(0, ifindex=5), 0)[1] is None  # forgotten: bounded


def test_sync_pending_adopts_lost_records_drops_evicted_and_reports_stuck() -> None:
    fs = FlowState(ident=REC.wire, max_waiting=1000)
    fs.seen(key(1), 0)
    fs.seen(key(2), 0)
    # key(2) left the pending map (decided elsewhere or evicted); key(3)'s
    # ring record was lost.
    assert fs.sync_pending([key(1), key(3)], 10) == []
    assert fs.is_waiting(key(1)) and fs.is_waiting(key(3)) and not fs.is_waiting(key(2))
    stuck = fs.sync_pending([key(1), key(3)], STUCK_AFTER_NS + 1)
    assert stuck == [key(1)]  # key(3) started waiting at 10
    assert fs.sync_pending([key(1), key(3)], STUCK_AFTER_NS + 2) == []  # re-stamped


def test_a_key_adopted_after_its_conntrack_event_is_asked_about_at_once() -> None:
    # The event was read, the ring record not yet when the sweep found the
    # key in the pending map: the record then finds it waiting and asks
    # nothing, and the event is gone; without an answer now it waited until
    # stuck, a whole sweep later (1 s instead of some microseconds).
    fs = FlowState(ident=REC.wire, max_waiting=1000)
    e = entry(41000)
    assert fs.updated(e, *ids(e), new=True) == []
    assert fs.sync_pending([key(41000), key(41001)], 10) == [key(41000)]
    assert fs.seen(key(41000), 20) == (Seen.NOTHING, None)  # the record, late
    assert fs.sync_pending([key(41000), key(41001)], 30) == []  # asked once


def test_stuck_queries_are_bounded() -> None:
    fs = FlowState(ident=REC.wire, max_waiting=10_000)
    keys = [key(p) for p in range(STUCK_BUDGET + 50)]
    fs.sync_pending(keys, 0)
    assert len(fs.sync_pending(keys, STUCK_AFTER_NS + 1)) == STUCK_BUDGET
    assert len(fs.sync_pending(keys, STUCK_AFTER_NS + 2)) == 50


def test_the_fast_and_the_plain_ids_agree() -> None:
    # Records.wire reads the id from raw bytes; raw_key_id builds a FlowKey.
    for k in (key(), key(reply=True), key(1234, ifindex=9)):
        assert REC.wire(k) == raw_key_id(k) == key_id(FlowKey.unpack(k))


def test_updates_bring_the_connection_mark_for_the_sweep() -> None:
    fs = FlowState(ident=REC.wire, max_waiting=16)
    e = entry()
    e = CtEntry(e.orig, e.reply, e.status, e.tcp_state, e.zone, e.helper, e.timeout, mark=0x200)
    orig, reply = ids(e)
    fs.updated(e, orig, reply)
    assert fs.take_marks() == {orig: 0x200, reply: 0x200}
    assert fs.take_marks() == {}
    fs.updated(e, orig, reply)  # the same mark as the last event: nothing changed
    assert fs.take_marks() == {}
    moved = e._replace(mark=0x300)
    fs.updated(moved, orig, reply)
    assert fs.take_marks() == {orig: 0x300, reply: 0x300}


def test_a_new_connection_brings_no_mark_to_compare() -> None:
    fs = FlowState(ident=REC.wire, max_waiting=16)
    e = entry()._replace(mark=0x200)
    orig, reply = ids(e)
    fs.updated(e, orig, reply, new=True)
    assert fs.take_marks() == {}
    fs.forget(orig, reply)
    fs.updated(e, orig, reply)  # an UPDATE with no earlier event remembered
    assert fs.take_marks() == {orig: 0x200, reply: 0x200}


def test_a_raw_keys_id_is_the_wire_id_of_its_tuple() -> None:
    """Records.wire slices the key's bytes; it must equal the id built from
    the tuple's fields (conntrack events and queries are matched by it)."""
    v6 = FlowKey(4, socket.AF_INET6, 17, ip("2001:db8::1"), ip("2001:db8:1::2"), 5353, 53,
                 vlan_outer=7)
    for raw in (key(), key(reply=True), v6.pack()):
        assert REC.wire(raw) == raw_key_id(raw) == key_id(FlowKey.unpack(raw))
    assert REC.wire(key(1)) != REC.wire(key(2)) and REC.wire(v6.pack()) != REC.wire(key())
