"""Handing flows back puts conntrack's own timeout back (offloader/handback.py),
against a fake flow map and a fake conntrack (no BPF, no root)."""

from __future__ import annotations

import ipaddress
import socket

from offloader.datapath import FlowKey, L2Header, Verdict
from offloader.decision import Teardown
from offloader.handback import Handback
from offloader.records import Records
from offloader.sweep import Sweeper, SweepPlan
from tests.unit.test_sweep import TIMEOUTS, FakeConntrack, FakeMap

ip = ipaddress.ip_address
NS = 1_000_000_000
NOW = 10_000 * NS
REC = Records()
LAN, WAN, ROUTER = ip("198.18.1.2"), ip("198.19.2.2"), ip("198.19.0.1")


def pair(sport: int = 40000, proto: int = 17) -> tuple[FlowKey, FlowKey]:
    """Both directions of one masqueraded connection: LAN -> WAN leaves as
    ROUTER:50000, the reply comes to ROUTER:50000 and goes to LAN."""
    orig = FlowKey(2, socket.AF_INET, proto, LAN, WAN, sport, 443)
    reply = FlowKey(3, socket.AF_INET, proto, WAN, ROUTER, 443, sport + 10000)
    return orig, reply


def value(k: FlowKey, *, last: int, assured: bool = False, state: int | None = None) -> bytes:
    l2 = L2Header(b"\x02" * 6, b"\x04" * 6)
    if k.ifindex == 2:  # the original direction: source NAT
        v = Verdict(oif=3, l2=l2, mtu=1500, key=k, nat_src=ROUTER, nat_sport=k.sport + 10000,
                    assured=assured)
    else:  # the reply: destination NAT back to the LAN host
        v = Verdict(oif=2, l2=l2, mtu=1500, key=k, nat_dst=LAN, nat_dport=k.dport - 10000,
                    reply=True, assured=assured)
    return v.pack(state, last_seen_ns=last)


def tick(now: int) -> SweepPlan:
    return SweepPlan(now_ns=now, sweep_no=0, tcp_idle_ns=300 * NS, udp_idle_ns=60 * NS,
                     timeouts=TIMEOUTS, interval_s=1.0)


def test_the_partner_of_a_direction_is_found_through_its_nat() -> None:
    orig, reply = pair()
    hb = Handback(FakeConntrack(), REC)
    assert hb.partner_wire(orig.pack(), value(orig, last=NOW)) == REC.wire(reply.pack())
    assert hb.partner_wire(reply.pack(), value(reply, last=NOW)) == REC.wire(orig.pack())


def run_passes(sw: Sweeper, start: int, n: int) -> int:
    for i in range(n):
        sw.run(tick(start + i * NS))
    return start + n * NS


def test_an_idle_unreplied_flow_is_handed_back_and_its_entry_expires() -> None:
    """Idle 31 s: the kernel would have forgotten it after 30 s. Deleted,
    not left with the 300 s the agent gave it."""
    orig, _ = pair()
    fm = FakeMap([(orig, value(orig, last=NOW - 31 * NS))])
    ct = FakeConntrack()
    sw = Sweeper(fm, ct, REC)
    assert sw.run(tick(NOW)).reasons == {Teardown.IDLE: 1}
    assert fm.entries == {} and ct.back == []  # held while a pass looks for its partner
    run_passes(sw, NOW + NS, 2)
    assert ct.back == [((17, LAN.packed, WAN.packed, 40000, 443), False, 0, 0)]
    assert sw.handback.expired == 1


def test_an_assured_flow_gets_what_is_left_of_its_own_timeout() -> None:
    """udp_timeout 60 s hands an assured flow back before conntrack's 120 s:
    its entry gets the 120 s less the time since its last packet, seen from
    the moment it is put back."""
    orig, _ = pair()
    fm = FakeMap([(orig, value(orig, last=NOW - 61 * NS, assured=True))])
    ct = FakeConntrack()
    sw = Sweeper(fm, ct, REC)
    sw.run(tick(NOW))  # held: the next pass looks for its partner
    run_passes(sw, NOW + NS, 1)  # ... and at its end, NOW + 1 s, it is put back: 62 s idle
    assert ct.back == [((17, LAN.packed, WAN.packed, 40000, 443), False, 0, 120 - 62)]


def test_a_direction_handed_back_while_its_partner_is_active_leaves_the_entry_alone() -> None:
    orig, reply = pair()
    fm = FakeMap([(orig, value(orig, last=NOW - 31 * NS)), (reply, value(reply, last=NOW - NS))])
    ct = FakeConntrack()
    sw = Sweeper(fm, ct, REC)
    sw.run(tick(NOW))
    assert list(fm.entries) == [reply.pack()]
    for i in range(1, 5):  # the reply keeps carrying packets
        fm.entries[reply.pack()] = value(reply, last=NOW + (i - 1) * NS)
        sw.run(tick(NOW + i * NS))
    assert ct.back == [] and len(sw.handback) == 0


def test_both_directions_idle_are_put_back_once_from_the_later_packet() -> None:
    orig, reply = pair(proto=17)
    fm = FakeMap([(orig, value(orig, last=NOW - 65 * NS, assured=True)),
                  (reply, value(reply, last=NOW - 62 * NS, assured=True))])
    ct = FakeConntrack()
    sw = Sweeper(fm, ct, REC)
    sw.run(tick(NOW))
    assert fm.entries == {}
    run_passes(sw, NOW + NS, 2)
    ((_, _, _, timeout),) = ct.back
    assert timeout == 120 - 63  # the reply's packet, 62 s before, and 1 s until put back


def test_a_partner_the_kernel_forwards_gets_the_whole_class_timeout() -> None:
    """The other direction is passed: the kernel sees its packets, which we
    cannot date, so the entry gets the class's whole timeout, not less."""
    orig, reply = pair()
    fm = FakeMap([(orig, value(orig, last=NOW - 31 * NS)),
                  (reply, value(reply, last=NOW - NS, state=REC.state_offload + 1))])
    ct = FakeConntrack()
    sw = Sweeper(fm, ct, REC)
    sw.run(tick(NOW))
    run_passes(sw, NOW + NS, 2)
    assert [t for *_, t in ct.back] == [30]


def test_a_connection_offloaded_again_meanwhile_is_not_put_back() -> None:
    orig, _ = pair()
    fm = FakeMap([(orig, value(orig, last=NOW - 31 * NS))])
    ct = FakeConntrack()
    sw = Sweeper(fm, ct, REC)
    sw.run(tick(NOW))
    # Its next packet went to the kernel, which offloaded it again.
    fm.entries[orig.pack()] = value(orig, last=NOW + NS)
    ct.offloaded(orig.pack(), False, 0, False)
    run_passes(sw, NOW + NS, 3)
    assert ct.back == []
    assert ((17, LAN.packed, WAN.packed, 40000, 443), False, 0, 300) in ct.sent


def test_a_new_flow_gets_the_long_timeout_at_the_next_tick() -> None:
    udp_orig, _ = pair(proto=17)
    tcp_orig, _ = pair(sport=41000, proto=6)
    fm = FakeMap([(udp_orig, value(udp_orig, last=NOW)), (tcp_orig, value(tcp_orig, last=NOW))])
    ct = FakeConntrack()
    sw = Sweeper(fm, ct, REC)
    sw.run(tick(NOW))  # the first pass: every active flow
    ct.sent.clear()
    ct.offloaded(udp_orig.pack(), False, 0, False)
    ct.offloaded(tcp_orig.pack(), False, 0, True)  # its class's timeout is the long one already
    sw.run(tick(NOW + NS))
    assert ((17, LAN.packed, WAN.packed, 40000, 443), False, 0, 300) in ct.sent
    assert all(proto == 17 for (proto, *_), *_ in ct.sent)


def test_a_flush_puts_every_timeout_back_at_once() -> None:
    orig, reply = pair()
    other, _ = pair(sport=40001)
    fm = FakeMap([(orig, value(orig, last=NOW - 5 * NS)), (reply, value(reply, last=NOW - 2 * NS)),
                  (other, value(other, last=NOW - 40 * NS))])
    ct = FakeConntrack()
    sw = Sweeper(fm, ct, REC)
    assert sw.hand_back_all(TIMEOUTS, now_ns=NOW) == 3
    assert fm.entries == {}
    # other expired (deleted); each direction of the pair from its own last packet
    assert sorted(t for *_, t in ct.back) == [0, 25, 28]


def test_a_flush_never_deletes_a_connection_whose_other_direction_is_live() -> None:
    """The original direction went 31 s without a packet (the sweep had not
    come to it yet), the reply carried one a second ago: the connection is
    alive, its entry gets the reply's timeout, and is not deleted. Held
    directions stay bounded: the walk holds only those about to expire."""
    orig, reply = pair()
    lone, _ = pair(sport=40002)
    passed, passed_reply = pair(sport=40003)
    fm = FakeMap([(orig, value(orig, last=NOW - 31 * NS)), (reply, value(reply, last=NOW - NS)),
                  (lone, value(lone, last=NOW - 31 * NS)),
                  (passed, value(passed, last=NOW - 31 * NS)),
                  (passed_reply, value(passed_reply, last=NOW - NS, state=REC.state_offload + 1))])
    ct = FakeConntrack()
    sw = Sweeper(fm, ct, REC)
    sw.hand_back_all(TIMEOUTS, now_ns=NOW)
    by_port = {(sport, dport): t for (_p, _s, _d, sport, dport), _r, _z, t in ct.back}
    assert by_port == {(443, 50000): 29, (40002, 443): 0, (40003, 443): 30}, by_port
    assert len(sw.handback) == 0


def test_shutdown_puts_timeouts_back_and_keeps_the_entries() -> None:
    orig, _ = pair()
    fm = FakeMap([(orig, value(orig, last=NOW - 5 * NS))])
    ct = FakeConntrack()
    sw = Sweeper(fm, ct, REC)
    assert sw.hand_back_all(TIMEOUTS, delete=False, now_ns=NOW) == 0
    assert list(fm.entries) == [orig.pack()] and [t for *_, t in ct.back] == [25]


def test_flows_the_agent_removes_are_held_then_put_back() -> None:
    """A MAC or route change removes a flow outside the sweep: held, checked
    against the map, put back."""
    orig, _ = pair()
    fm = FakeMap([])
    ct = FakeConntrack()
    sw = Sweeper(fm, ct, REC)
    sw.run(tick(NOW))  # the timeouts are known from a sweep
    sw.hand_back([(orig.pack(), value(orig, last=NOW - 10 * NS))])
    run_passes(sw, NOW + NS, 2)
    assert [t for *_, t in ct.back] == [30 - 12]  # held after a pass: put back two passes on


def test_a_new_flow_whose_entry_went_meanwhile_is_torn_down_and_counted() -> None:
    orig, _ = pair()
    fm = FakeMap([(orig, value(orig, last=NOW))])
    ct = FakeConntrack(missing={orig.pack()})
    sw = Sweeper(fm, ct, REC)
    ct.offloaded(orig.pack(), False, 0, False)
    assert sw.run(tick(NOW)).reasons[Teardown.CT_GONE] == 1
    assert fm.entries == {}
