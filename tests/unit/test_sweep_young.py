"""Young flows (OFL_V_YOUNG): a new UDP flow is offloaded with conntrack's
own timeout, renewed only if it carries a packet, handed back untouched if
not. Classified from map bytes, and a Sweeper against fake map and
conntrack (no BPF, no root)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from offloader.conntrack import CtEntry, Tuple5
from offloader.datapath import FlowKey, L2Header, Verdict
from offloader.decision import Teardown, verdict_for
from offloader.layout import layout
from offloader.routing import Egress
from offloader.sweep import YOUNG_SPARE_S, RefreshClass, Sweeper, SweepPlan, SweepResult
from tests.unit.test_sweep import NOW, NS, REC, TIMEOUTS, FakeConntrack, ip, run

T = TIMEOUTS[RefreshClass.UDP_NEW]  # 30 s: the kernel's own timeout of a replied, unassured flow


def ukey(sport: int) -> FlowKey:
    return FlowKey(2, socket.AF_INET, socket.IPPROTO_UDP, ip("198.18.1.2"), ip("198.19.2.2"),
                   sport, 53)


def young(k: FlowKey, *, last: int, packets: int = 0, young: bool = True) -> bytes:
    """A value as the decider writes it (stamped ``last``), after
    ``packets`` offloaded packets."""
    lay = layout()
    raw = Verdict(oif=3, l2=L2Header(b"\x02" * 6, b"\x04" * 6), mtu=1500, key=k,
                  young=young).pack(last_seen_ns=last)
    f = lay.from_bytes("struct ofl_flow", raw)
    f.packets = packets
    return lay.to_bytes(f)


def at(now_ns: int, interval_s: float = 1.0) -> SweepPlan:
    return SweepPlan(now_ns, 0, 300 * NS, 60 * NS, TIMEOUTS, interval_s)


def test_the_decider_marks_udp_flows_young_and_tcp_flows_not() -> None:
    assert young(ukey(1), last=NOW)[REC.v_flags] & REC.flag_young
    tcp = ukey(1).replace(proto=socket.IPPROTO_TCP)
    t = Tuple5(socket.IPPROTO_TCP, tcp.src, tcp.dst, 1, 53)
    entry = CtEntry(t, t, 0, -1, 0, False, 30)
    path = Egress(oif=3, l2=L2Header(b"\x02" * 6, b"\x04" * 6), mtu=1500, l3_oif=3,
                  nexthop=None)
    assert not verdict_for(tcp, path, t, entry, False).young
    assert verdict_for(ukey(1), path, t._replace(proto=17), entry, False).young


def outcome(sport: int, start: int | None, phase_ns: int, interval_s: float = 1.0
            ) -> tuple[str, int]:
    """Sweeps once a second from the offload (at NOW + ``phase_ns``) for
    the kernel's whole T; the flow carries a packet each second from
    ``start`` seconds on (None: never). Returns what came first and when
    (seconds after the offload): renewed, removed, or nothing in T."""
    k = ukey(sport)
    t0 = NOW + phase_ns
    for tick in range(1, T + 1):
        now = t0 + tick * NS
        sent = 0 if start is None or tick < start else tick - start + 1
        last = t0 if not sent else now - NS // 10
        r: SweepResult = run([(k, young(k, last=last, packets=sent))], at(now, interval_s))
        if r.refresh:
            (ref,) = r.refresh
            assert ref.cls is RefreshClass.UDP_NEW and sent > 0
            assert r.settled == [k.pack()]
            return "renewed", tick
        if r.remove:
            assert r.reasons == {Teardown.IDLE: 1} and sent == 0
            assert r.handed == []  # its entry has what the kernel left it: nothing put back
            return "removed", tick
    return "nothing", T


@pytest.mark.parametrize("interval_s", [1.0, 5.0])  # a tick late, a pass spread over five
def test_a_young_flow_is_renewed_within_its_own_timeout_or_handed_back_before(
        interval_s: float) -> None:
    """Whatever the flow's phase in the period and whenever its first
    packet after the offload comes, its entry (T from the offload) is
    renewed before T runs out, or the flow is back with the kernel before
    that packet: never offloaded under an entry about to expire."""
    seen = set()
    for sport in range(1000, 65000, 4093):  # phases spread over the 15 s period
        for start in [None, *range(1, T)]:
            what, tick = outcome(sport, start, NS // 3, interval_s)
            assert what != "nothing", (sport, start)
            assert tick + interval_s <= T - YOUNG_SPARE_S, (sport, start, what, tick)
            if what == "removed":
                assert start is None or tick < start, (sport, start, tick)
            seen.add(what)
    assert seen == {"renewed", "removed"}


def test_a_young_flow_that_carries_nothing_is_kept_until_no_later_instant_would_do() -> None:
    """Not handed back at the first read after its offload (the flows of a
    reply that are used again soon stay), only when waiting a period more
    could miss T."""
    removed = [outcome(sport, None, NS // 3)[1] for sport in range(1000, 65000, 4093)]
    period = at(NOW).period_s(RefreshClass.UDP_NEW, short=True)
    assert all(T - YOUNG_SPARE_S - period - 1.0 - 1 <= t <= T for t in removed), removed


def test_a_flow_not_young_is_left_to_the_long_schedule() -> None:
    k = ukey(7)
    # a packet just now, on its first read: a young flow would be due on the short table
    r = run([(k, young(k, last=NOW - NS // 2, packets=3, young=False))], at(NOW, 0.5))
    assert r.settled == [] and r.remove == []


def test_untouched_young_flows_are_neither_put_back_nor_counted_offloaded() -> None:
    """Torn down for a reason that puts the timeout back (idle, a mark
    change), an untouched young flow puts nothing back: the kernel's own
    timeout is what its entry has. A handed-back partner found young and
    untouched is kernel-side (the whole class timeout goes back); one that
    carried packets is offloaded (the hand-back is cancelled)."""
    quiet, busy = ukey(11), ukey(12)
    p = at(NOW)
    p.marks = {REC.wire(quiet.pack()): 9, REC.wire(busy.pack()): 9}  # both re-marked
    r = run([(quiet, young(quiet, last=NOW - NS)), (busy, young(busy, last=NOW - NS, packets=4))],
            p)
    assert r.reasons == {Teardown.CT_MARK: 2}
    assert [h[0] for h in r.handed] == [busy.pack()]
    p = at(NOW)
    p.held = {REC.wire(quiet.pack()), REC.wire(busy.pack())}
    r = run([(quiet, young(quiet, last=NOW - NS)), (busy, young(busy, last=NOW - NS, packets=4))],
            p)
    assert sorted(r.found) == sorted([(REC.wire(quiet.pack()), False),
                                      (REC.wire(busy.pack()), True)])


class Map:
    def __init__(self, entries: dict[bytes, bytes]) -> None:
        self.entries = entries

    def batches(self) -> Iterator[tuple[bytes, bytes, int]]:
        items = list(self.entries.items())
        yield b"".join(k for k, _ in items), b"".join(v for _, v in items), len(items)

    def delete_batch(self, keys: list[bytes]) -> int:
        return sum(self.entries.pop(k, None) is not None for k in keys)

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        if key not in self.entries:
            raise AssertionError("BPF_EXIST: only entries that are there")
        self.entries[key] = value

    def lookup(self, key: bytes) -> bytes | None:
        return self.entries.get(key)


class FailingConntrack(FakeConntrack):
    def refresh_keys(self, items, tags):  # type: ignore[no-untyped-def]
        raise OSError(105, "No buffer space available")


def test_the_sweeper_renews_a_busy_young_flow_with_the_long_timeout_and_clears_its_flag() -> None:
    busy, quiet = ukey(21), ukey(22)
    fm = Map({busy.pack(): young(busy, last=NOW - NS // 2, packets=5),
              quiet.pack(): young(quiet, last=NOW - 29 * NS)})
    ct = FakeConntrack()
    sw = Sweeper(fm, ct, REC)
    result = sw.run(at(NOW))  # the first pass: every flow is due
    assert ct.sent == [((17, busy.src.packed, busy.dst.packed, 21, 53), False, 0, 300)]
    assert not fm.entries[busy.pack()][REC.v_flags] & REC.flag_young and sw.settled == 1
    assert quiet.pack() not in fm.entries and result.reasons == {Teardown.IDLE: 1}
    assert ct.back == []  # the quiet one's entry is the kernel's: nothing put back


def test_clearing_the_flag_keeps_what_the_datapath_counted_since_the_read() -> None:
    busy = ukey(24)
    fm = Map({busy.pack(): young(busy, last=NOW - NS // 2, packets=5)})

    class Counting(FakeConntrack):
        def refresh_keys(self, items, tags):  # type: ignore[no-untyped-def]
            # the flow's packets while the renewal is on its way
            fm.entries[busy.pack()] = young(busy, last=NOW, packets=60)
            return super().refresh_keys(items, tags)

    sw = Sweeper(fm, Counting(), REC)
    sw.run(at(NOW))
    value = fm.entries[busy.pack()]
    assert not value[REC.v_flags] & REC.flag_young and sw.settled == 1
    assert value == REC.with_flags(young(busy, last=NOW, packets=60), 0, REC.flag_young)


def test_a_failed_renewal_leaves_the_flow_young() -> None:
    busy = ukey(23)
    fm = Map({busy.pack(): young(busy, last=NOW - NS // 2, packets=5)})
    sw = Sweeper(fm, FailingConntrack(), REC)
    sw.run(at(NOW))
    assert sw.failures == 1 and sw.settled == 0
    assert fm.entries[busy.pack()][REC.v_flags] & REC.flag_young  # due again in time


def test_shutdown_puts_back_only_what_the_offload_changed() -> None:
    quiet, busy, old = ukey(31), ukey(32), ukey(33)
    fm = Map({quiet.pack(): young(quiet, last=NOW - NS),
              busy.pack(): young(busy, last=NOW - NS, packets=2),
              old.pack(): young(old, last=NOW - NS, packets=2, young=False)})
    ct = FakeConntrack()
    sw = Sweeper(fm, ct, REC)
    sw.run(at(NOW + 100 * NS))  # a sweep ran: the agent knows the timeouts
    ct.back.clear()
    fm.entries = {quiet.pack(): young(quiet, last=NOW - NS),
                  busy.pack(): young(busy, last=NOW - NS, packets=2),
                  old.pack(): young(old, last=NOW - NS, packets=2, young=False)}
    sw.hand_back_all(TIMEOUTS, now_ns=NOW)
    assert sorted(b[0][3] for b in ct.back) == [32, 33]  # the quiet one is the kernel's already


def test_the_first_pass_after_a_start_keeps_a_flow_offloaded_just_now() -> None:
    """The first pass counts every flow as due (nothing was read before),
    but the next pass reads it again within the sweep's spread: a flow
    offloaded a moment ago waits for its packets."""
    just, old = ukey(41), ukey(42)
    fm = Map({just.pack(): young(just, last=NOW - NS // 3),
              old.pack(): young(old, last=NOW - 20 * NS)})
    sw = Sweeper(fm, FakeConntrack(), REC)
    sw.run(at(NOW))
    assert list(fm.entries) == [just.pack()]  # the 20 s old one could not wait a period more
