"""The sweep's classification from map bytes alone, and the Sweeper against
a fake flow map (no BPF, no root)."""

from __future__ import annotations

import bisect
import hashlib
import ipaddress
import socket
import sys
from collections.abc import Iterator, Sequence

import pytest

from offloader.conntrack import raw_wire_id
from offloader.datapath import FlowKey, L2Header, Verdict, pass_value
from offloader.decision import Teardown
from offloader.errors import MapError
from offloader.layout import layout
from offloader.records import Records
from offloader.sweep import SERVED_BATCH, RefreshClass, Sweeper, SweepPlan, SweepResult, classify

ip = ipaddress.ip_address
NS = 1_000_000_000
NOW = 1_000 * NS
REC = Records()
TIMEOUTS = {RefreshClass.TCP: 432000, RefreshClass.UDP: 120, RefreshClass.UDP_NEW: 30}


def key(proto: int = 6, sport: int = 40000) -> FlowKey:
    return FlowKey(2, socket.AF_INET, proto, ip("198.18.1.2"), ip("198.19.2.2"), sport, 443)


def flow(k: FlowKey, *, last: int = NOW - NS, seen: int = 0, assured: bool = True,
         reply: bool = False, zone: int = 0, state: int | None = None) -> bytes:
    lay = layout()
    raw = Verdict(oif=3, l2=L2Header(b"\x02" * 6, b"\x04" * 6), mtu=1500, key=k, reply=reply,
                  zone=zone, assured=assured).pack(state)
    f = lay.from_bytes("struct ofl_flow", raw)
    f.last_seen_ns = last
    f.seen = seen
    return lay.to_bytes(f)


def plan(sweep_no: int = 0, dead: set[bytes] | None = None, interval: float = 1.0) -> SweepPlan:
    return SweepPlan(now_ns=NOW, sweep_no=sweep_no, tcp_idle_ns=300 * NS, udp_idle_ns=60 * NS,
                     timeouts=TIMEOUTS, interval_s=interval, dead=dead or set())



def run(entries: list[tuple[FlowKey, bytes]], p: SweepPlan) -> SweepResult:
    kb = b"".join(k.pack() for k, _ in entries)
    vb = b"".join(v for _, v in entries)
    return classify(kb, vb, p, REC)


def test_tcp_flags_hand_the_flow_back() -> None:
    r = run([(key(), flow(key(), seen=1))], plan())
    assert r.remove == [key().pack()] and r.reasons == {Teardown.TCP_FLAGS: 1}


@pytest.mark.parametrize("proto, assured, idle_s, gone", [
    (6, True, 299, False), (6, True, 301, True), (17, True, 59, False), (17, True, 61, True),
    # Unreplied UDP: conntrack's own 30 s, not udp_timeout's 60 s: its entry
    # has the long timeout while offloaded, and the kernel would have
    # forgotten the connection after 30 s.
    (17, False, 29, False), (17, False, 31, True)])
def test_idle_per_class_never_past_conntrack_own_timeout(proto: int, assured: bool, idle_s: int,
                                                         gone: bool) -> None:
    k = key(proto)
    r = run([(k, flow(k, last=NOW - idle_s * NS, assured=assured))], plan())
    assert (r.reasons == {Teardown.IDLE: 1}) is gone


def test_destroyed_connections_go_others_stay() -> None:
    dead_key, live_key = key(sport=1000), key(sport=1001)
    dead = {raw_wire_id(REC.raw5(dead_key.pack()))}
    r = run([(dead_key, flow(dead_key)), (live_key, flow(live_key))], plan(dead=dead))
    assert r.remove == [dead_key.pack()] and r.reasons == {Teardown.CT_DESTROYED: 1}


def test_never_seen_flow_is_not_refreshed_nor_idled() -> None:
    # last_seen 0: the datapath never forwarded a packet of it yet.
    k = key(17)
    r = run([(k, flow(k, last=0))], plan())
    assert r.remove == [] and r.refresh == []


def test_pass_entries_are_not_refreshed() -> None:
    k = key()
    r = run([(k, pass_value())], plan())
    assert r.refresh == [] and r.remove == []


@pytest.mark.parametrize("proto, assured, cls", [
    (6, True, RefreshClass.TCP), (17, True, RefreshClass.UDP), (17, False, RefreshClass.UDP_NEW)])
def test_refresh_class_and_once_a_period(proto: int, assured: bool, cls: RefreshClass) -> None:
    k = key(proto, sport=40000)
    period = int(plan().period_s(cls))

    def at(tick: int) -> SweepPlan:  # one sweep a second, each reading what the last one read
        return SweepPlan(now_ns=NOW + tick * NS, sweep_no=tick, tcp_idle_ns=300 * NS,
                         udp_idle_ns=60 * NS, timeouts=TIMEOUTS, interval_s=1.0)

    def sweep(tick: int) -> SweepResult:
        raw = flow(k, assured=assured, reply=True, zone=4, last=NOW + tick * NS - NS // 2)
        return run([(k, raw)], at(tick))

    found = [tick for tick in range(3 * period) if sweep(tick).refresh]
    assert len(found) == 3 and found[1] - found[0] == found[2] - found[1] == period
    (ref,) = sweep(found[0]).refresh
    assert (ref.cls, ref.reply, ref.zone, ref.raw_key) == (cls, True, 4, k.pack())


def test_a_flow_the_kernel_saw_a_packet_of_stays_and_is_renewed_on_its_class_period() -> None:
    """OFL_SEEN_KERNEL (the datapath passed a hit: TTL, MTU): that packet
    put conntrack's own 30 s back, so the long timeout's 150 s period would
    let the entry expire under an active flow; it is renewed every 15 s."""
    k = key(17, sport=40000)
    kernel = REC.seen_kernel
    short = int(plan().period_s(RefreshClass.UDP_NEW, short=True))
    assert (short, int(plan().period_s(RefreshClass.UDP_NEW))) == (15, 150)

    def sweep(tick: int, seen: int) -> SweepResult:
        p = SweepPlan(NOW + tick * NS, tick, 300 * NS, 60 * NS, TIMEOUTS, 1.0)
        return run([(k, flow(k, assured=False, seen=seen, last=NOW + tick * NS - NS // 2))], p)

    assert sweep(0, kernel).remove == []  # not a reason to hand it back
    found = [t for t in range(3 * short) if sweep(t, kernel).refresh]
    assert len(found) == 3 and found[1] - found[0] == found[2] - found[1] == short
    assert len([t for t in range(3 * short) if sweep(t, 0).refresh]) <= 1  # without: long period
    (ref,) = sweep(found[0], kernel).refresh
    assert ref.cls is RefreshClass.UDP_NEW  # renewed with the long timeout, more often
    assert sweep(0, kernel | 1).reasons == {Teardown.TCP_FLAGS: 1}  # a FIN still closes


def test_a_flow_idle_longer_than_the_period_is_not_refreshed() -> None:
    k = key(6)  # TCP: idles out after 300 s, renewed every 150 s
    period = int(plan().period_s(RefreshClass.TCP))
    for tick in range(period + 1):  # a whole period: its instant comes in one of them
        p = plan()
        p.now_ns = NOW + tick * NS
        r = run([(k, flow(k, last=p.now_ns - (period + 2) * NS))], p)  # period + 1 s, and 1 s more
        assert r.refresh == [] and r.remove == []
    # the same flow with a packet a second ago is renewed in one of those sweeps
    assert any(run([(k, flow(k, last=NOW + (t - 1) * NS))],
                   SweepPlan(NOW + t * NS, t, 300 * NS, 60 * NS, TIMEOUTS, 1.0)).refresh
               for t in range(period + 1))


def test_offloaded_flows_keep_a_long_timeout_never_shorter_than_their_class() -> None:
    p = plan()
    assert p.keep_s(RefreshClass.TCP) == 432000  # established's 5 days stay
    assert p.keep_s(RefreshClass.UDP) == p.keep_s(RefreshClass.UDP_NEW) == 300
    p.offload_timeout_s = 100
    assert (p.keep_s(RefreshClass.UDP), p.keep_s(RefreshClass.UDP_NEW)) == (120, 100)


def test_periods_are_half_the_long_timeout_or_a_third_within_bounds() -> None:
    p = plan()
    assert p.period_s(RefreshClass.TCP) == 150.0  # capped
    assert p.period_s(RefreshClass.UDP) == 150.0  # half of 300 s
    assert p.period_s(RefreshClass.UDP_NEW) == 150.0  # was 15 s with its own 30 s
    short = SweepPlan(NOW, 0, 1, 1, {c: 12 for c in RefreshClass}, 1.0, offload_timeout_s=12)
    assert short.period_s(RefreshClass.UDP_NEW) == 4.0  # half would leave only 6 s
    assert SweepPlan(NOW, 0, 1, 1, {c: 1 for c in RefreshClass}, 1.0,
                     offload_timeout_s=1).period_s(RefreshClass.TCP) == 1.0


class FakeMap:
    def __init__(self, entries: list[tuple[FlowKey, bytes]], fail: bool = False) -> None:
        self.entries = {k.pack(): v for k, v in entries}
        self.fail = fail

    def batches(self, batch: int | None = None) -> Iterator[tuple[bytes, bytes, int]]:
        if self.fail:
            raise MapError("lookup batch of ofl_flows", errno=22)
        items = list(self.entries.items())
        step = batch or max(1, len(items))
        for i in range(0, len(items), step):
            part = items[i : i + step]
            yield b"".join(k for k, _ in part), b"".join(v for _, v in part), len(part)

    def delete_batch(self, keys: list[bytes]) -> int:
        for k in keys:
            self.entries.pop(k, None)
        return len(keys)


class FakeConntrack:
    """Conntrack's keep-alive side: records refreshes; ``missing`` keys
    answer as gone (ENOENT), as the kernel does for a forgotten entry."""

    def __init__(self, missing: set[bytes] | None = None) -> None:
        self.sent: list[object] = []
        self.back: list[tuple[tuple[int, bytes, bytes, int, int], bool, int, int]] = []
        self.missing = missing or set()
        self.gone: list[bytes] = []
        self.fresh: list[tuple[bytes, bool, int, bool]] = []

    def refresh_keys(self, items: Sequence[tuple[bytes, bytes, bytes, bytes, int, bool, int, int]],
                     tags: Sequence[bytes]) -> int:
        """Recorded as ((proto, src, dst, sport, dport), reply, zone, timeout)."""
        self.sent.extend(((proto, src, dst, int.from_bytes(sport, "big"),
                           int.from_bytes(dport, "big")), reply, zone, timeout)
                         for src, dst, sport, dport, proto, reply, zone, timeout in items)
        self.gone.extend(t for t in tags if t in self.missing)
        return len(items)

    def take_gone(self) -> list[bytes]:
        gone, self.gone = self.gone, []
        return gone

    def offloaded(self, raw_key: bytes, reply: bool, zone: int, assured: bool) -> None:
        self.fresh.append((raw_key, reply, zone, assured))

    def take_offloaded(self) -> list[tuple[bytes, bool, int, bool]]:
        fresh, self.fresh = self.fresh, []
        return fresh

    def put_back(self, items: Sequence[tuple[bytes, bytes, bytes, bytes, int, bool, int, int]]
                 ) -> int:
        """Recorded as in ``sent``, in ``back``; timeout 0 is a deletion."""
        self.back.extend(((proto, src, dst, int.from_bytes(sport, "big"),
                           int.from_bytes(dport, "big")), reply, zone, timeout)
                         for src, dst, sport, dport, proto, reply, zone, timeout in items)
        return len(items)


def test_sweeper_deletes_and_refreshes() -> None:
    gone, kept = key(sport=1), key(sport=2)
    fm = FakeMap([(gone, flow(gone, seen=1)), (kept, flow(kept))])
    ct = FakeConntrack()
    sw = Sweeper(fm, ct, REC)
    result = sw.run(plan())  # the first pass: every active flow is due
    assert list(fm.entries) == [kept.pack()]
    assert result.reasons == {Teardown.TCP_FLAGS: 1}
    assert ct.sent == [((6, kept.src.packed, kept.dst.packed, 2, 443), False, 0, 432000)]
    assert sw.refreshed == 1


def test_a_refresh_that_finds_no_entry_tears_the_flow_down() -> None:
    lost, kept = key(sport=2), key(sport=3)
    fm = FakeMap([(lost, flow(lost, last=NOW - NS // 2)), (kept, flow(kept, last=NOW - NS // 2))])
    sw = Sweeper(fm, FakeConntrack(missing={lost.pack()}), REC)
    # Both flows fall due in the same sweep (one slice: a 1 s timeout).
    p = SweepPlan(NOW, 0, 300 * NS, 60 * NS, {c: 1 for c in RefreshClass}, 1.0)
    result = sw.run(p)
    assert result.reasons == {Teardown.CT_GONE: 1}
    assert list(fm.entries) == [kept.pack()]


def test_a_failed_pass_is_logged_never_raised(caplog: pytest.LogCaptureFixture) -> None:
    sw = Sweeper(FakeMap([], fail=True), FakeConntrack(), REC)
    result = sw.run(plan())
    assert sw.failures == 1 and result.remove == []
    assert "sweep failed" in caplog.text


def counted(raw: bytes, packets: int, nbytes: int) -> bytes:
    lay = layout()
    f = lay.from_bytes("struct ofl_flow", raw)
    f.packets, f.bytes = packets, nbytes
    return lay.to_bytes(f)


@pytest.mark.parametrize("proto, packets, nbytes, ingress, to_tc", [
    (6, 1000, 1_400_000, 2, True),  # TCP bulk on a hybrid device
    (6, 1000, 900_000, 2, False),  # not enough bytes yet
    (6, 5000, 1_400_000, 2, False),  # small packets: stays in XDP
    (17, 1000, 1_400_000, 2, False),  # UDP stays in XDP
    (6, 1000, 1_400_000, 9, False),  # ingress device is not hybrid
])
def test_hybrid_hands_tcp_bulk_to_tc(proto: int, packets: int, nbytes: int, ingress: int,
                                     to_tc: bool) -> None:
    k = key(proto).replace(ifindex=ingress)
    raw = counted(flow(k), packets, nbytes)
    p = plan()
    p.hybrid = frozenset({2})
    r = run([(k, raw)], p)
    assert bool(r.to_tc) is to_tc
    if to_tc:
        ((rk, rv),) = r.to_tc
        assert rk == k.pack() and rv[REC.v_flags] & REC.flag_tc
        assert rv[: REC.v_flags] + rv[REC.v_flags + 1 :] == raw[: REC.v_flags] + raw[REC.v_flags + 1 :]
        # Once marked, it is not handed over again.
        assert run([(k, rv)], p).to_tc == []


def test_hybrid_keeps_encapsulated_flows_in_xdp() -> None:
    k = key(6).replace(pppoe_sid=7)
    p = plan()
    p.hybrid = frozenset({2})
    assert run([(k, counted(flow(k), 1000, 1_400_000))], p).to_tc == []


def test_a_flow_looked_up_with_another_mark_is_decided_again() -> None:
    moved, same = key(sport=1000), key(sport=1001)
    raw_moved = Verdict(oif=3, l2=L2Header(b"\x02" * 6, b"\x04" * 6), mtu=1500, key=moved,
                        mark=0x100).pack(last_seen_ns=NOW - NS)
    raw_same = Verdict(oif=3, l2=L2Header(b"\x02" * 6, b"\x04" * 6), mtu=1500, key=same,
                       mark=0x200).pack(last_seen_ns=NOW - NS)
    p = plan()
    p.marks = {REC.wire(moved.pack()): 0x200, REC.wire(same.pack()): 0x200}
    r = run([(moved, raw_moved), (same, raw_same)], p)
    assert r.remove == [moved.pack()] and r.reasons == {Teardown.CT_MARK: 1}


# -- a pass spread over ticks ------------------------------------------------------------------
class WalkedMap:
    """A flow map walked the way the kernel walks a hash map in batches: in
    a fixed bucket order (here a hash of the key), resuming after the last
    bucket read, and seeing the map as it is at each batch (entries added or
    removed meanwhile)."""

    def __init__(self, entries: list[tuple[FlowKey, bytes]], batch: int = 100) -> None:
        self.entries = {k.pack(): v for k, v in entries}
        self.batch = batch
        self.read_at: dict[bytes, list[int]] = {}  # key -> the ticks it was read in
        self.tick = 0
        self._order: list[tuple[int, bytes]] = []

    def _ordered(self) -> list[tuple[int, bytes]]:
        if len(self._order) != len(self.entries):  # keys added or removed
            self._order = sorted((self.bucket(k), k) for k in self.entries)
        return self._order

    @staticmethod
    def bucket(raw: bytes) -> int:
        return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")

    def batches(self) -> Iterator[tuple[bytes, bytes, int]]:
        after = -1
        while True:
            order = self._ordered()
            at = bisect.bisect_right(order, (after, b"\xff" * 64))
            chunk = [k for _, k in order[at : at + self.batch]]
            if not chunk:
                return
            after = self.bucket(chunk[-1])
            for k in chunk:
                self.read_at.setdefault(k, []).append(self.tick)
            yield b"".join(chunk), b"".join(self.entries[k] for k in chunk), len(chunk)

    def delete_batch(self, keys: list[bytes]) -> int:
        return sum(self.entries.pop(k, None) is not None for k in keys)

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        self.entries[key] = value


def udp_key(i: int) -> FlowKey:
    return FlowKey(2, socket.AF_INET, 17, ip("198.18.1.2"), ip("198.19.2.2"), 1024 + i % 60000,
                   20000 + i // 60000)


def tick_plan(now: int, dead: set[bytes] | None = None, keep: int = 300) -> SweepPlan:
    return SweepPlan(now_ns=now, sweep_no=0, tcp_idle_ns=300 * NS, udp_idle_ns=60 * NS,
                     timeouts=TIMEOUTS, interval_s=1.0, dead=dead or set(),
                     offload_timeout_s=keep)


def test_every_entry_is_visited_once_a_pass_and_a_pass_ends_within_its_bound() -> None:
    fm = WalkedMap([(udp_key(i), flow(udp_key(i), assured=False)) for i in range(2000)])
    sw = Sweeper(fm, FakeConntrack(), REC, per_tick=300, max_ticks=4)
    walks_at = []
    for tick in range(40):
        fm.tick = tick
        if tick == 13:  # the map grows by half in the middle of a pass
            fm.entries.update((udp_key(i).pack(), flow(udp_key(i), assured=False))
                              for i in range(2000, 3000))
        sw.run(tick_plan(NOW + tick * NS))
        walks_at.append(sw.walks)
    # The first pass reads the whole map at once, then passes take 4 ticks.
    assert walks_at[:9] == [1, 1, 1, 1, 2, 2, 2, 2, 3]
    ends = [t for t in range(1, 40) if walks_at[t] != walks_at[t - 1]]
    assert all(b - a <= 4 for a, b in zip(ends, ends[1:], strict=False))
    for i in range(3000):
        ticks = fm.read_at[udp_key(i).pack()]
        assert all(b - a < 2 * 4 for a, b in zip(ticks, ticks[1:], strict=False)), ticks
        # the first pass saw the first 2,000; a later entry is seen within two passes
        assert ticks[0] == 0 if i < 2000 else 13 <= ticks[0] < 13 + 2 * 4


def test_an_active_flow_is_renewed_before_conntrack_would_drop_it() -> None:
    """Unreplied UDP offloaded with a 30 s long timeout (the schedule at
    100 s of clock: 300 s would need 1,000 ticks), renewed half of it apart,
    in a map walked over 6 ticks a pass, the ticks coming late now and then
    (3 s instead of 1): each flow that carries a packet every 2 s is renewed
    with that timeout at most a period plus two passes apart, inside 30 s;
    one that stopped is not renewed once a period and a pass have gone by."""
    n = 3000
    keys = [udp_key(i) for i in range(n)]
    fm = WalkedMap([(k, flow(k, assured=False)) for k in keys], batch=128)
    ct = FakeConntrack()
    sw = Sweeper(fm, ct, REC, per_tick=500, max_ticks=6)
    renewed: dict[tuple[int, int], list[float]] = {}
    stopped = keys[0].pack()
    # Each flow's value is built once; a tick writes only its last_seen_ns (the
    # bytes flow(k, assured=False, last=...) gives, built 300,000 times in 35 s).
    lay = layout()
    at = lay.ffi.offsetof("struct ofl_flow", "last_seen_ns")
    base = {k.pack(): flow(k, assured=False) for k in keys}
    assert base[stopped][:at] + (NOW + 59 * NS).to_bytes(8, sys.byteorder) + base[stopped][at + 8:] \
        == flow(keys[0], assured=False, last=NOW + 59 * NS)
    clock = 0.0
    for tick in range(100):
        clock += 3.0 if tick % 7 == 6 else 1.0
        now = NOW + int(clock * NS)
        for raw, value in base.items():  # every flow carried a packet within the last 2 s ...
            last = now - (tick % 2) * NS if raw != stopped or clock < 60 else NOW + 59 * NS
            fm.entries[raw] = value[:at] + last.to_bytes(8, sys.byteorder) + value[at + 8:]
        ct.sent.clear()
        sw.run(tick_plan(now, keep=30))
        for (_proto, _src, _dst, sport, dport), _reply, _zone, timeout in ct.sent:
            assert timeout == 30
            renewed.setdefault((sport, dport), []).append(clock)
    period = tick_plan(NOW, keep=30).period_s(RefreshClass.UDP_NEW)
    assert period == 15.0
    longest_pass = 6 * 3.0
    for k in keys[1:]:
        times = renewed[(k.sport, k.dport)]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert gaps and max(gaps) <= period + 2 * longest_pass
        assert max(gaps) < 30  # conntrack's own timeout never ran out
    late = [t for t in renewed[(keys[0].sport, keys[0].dport)] if t >= 60 + period + longest_pass]
    assert late == []


def test_a_connection_destroyed_during_a_pass_goes_within_two_passes() -> None:
    keys = [udp_key(i) for i in range(2000)]
    fm = WalkedMap([(k, flow(k, assured=False)) for k in keys])
    sw = Sweeper(fm, FakeConntrack(), REC, per_tick=300, max_ticks=4)
    sw.run(tick_plan(NOW))  # the first pass: the whole map
    sw.run(tick_plan(NOW + NS))  # the first share of the second pass
    first_read = [k for k, ticks in fm.read_at.items() if len(ticks) == 2]
    assert first_read  # read already in this pass: only the next pass finds them again
    victim = first_read[0]
    dead = {REC.wire(victim)}
    removed = []
    for tick in range(2, 2 + 2 * 4):
        fm.tick = tick
        removed.append(sw.run(tick_plan(NOW + tick * NS, dead if tick == 2 else None)).reasons)
        if victim not in fm.entries:
            break
    assert victim not in fm.entries
    assert sum(r[Teardown.CT_DESTROYED] for r in removed) == 1


def test_new_flows_renewals_let_the_loop_serve_between_chunks() -> None:
    """200 new flows' first renewals (the long timeout) are sent in chunks
    of FRESH_CHUNK, and the loop serves its other sources between them: at
    1,000 new flows a second one stretch held new flows back 23 ms."""
    fm = FakeMap([])
    ct = FakeConntrack()
    sw = Sweeper(fm, ct, REC)
    served: list[int] = []
    sw.serve_with(lambda: served.append(len(ct.sent)))
    for sport in range(200):
        ct.offloaded(key(17, sport=20000 + sport).pack(), False, 0, False)
    sw.run(plan())
    assert len(ct.sent) == 200 and {s[3] for s in ct.sent} == {300}  # each the long timeout
    # between chunks (then once after the map's batch, as before)
    assert served[:3] == [64, 128, 192] and 200 not in served[:3]


def test_the_walk_lets_the_loop_serve_every_served_batch_entries() -> None:
    """Served by the loop (the agent's sweep), the flow map is read SERVED_BATCH
    entries at a time and the loop serves its other sources after each: at
    1,024 a batch held new flows back about 10 ms."""
    n = 2 * SERVED_BATCH + 10
    fm = FakeMap([(k, flow(k)) for k in (key(17, sport=20000 + i) for i in range(n))])
    sw = Sweeper(fm, FakeConntrack(), REC)
    read: list[int] = []
    inner = fm.batches

    def counted(batch: int | None = None) -> Iterator[tuple[bytes, bytes, int]]:
        for kb, vb, count in inner(batch):
            read.append(count)
            yield kb, vb, count
    fm.batches = counted  # type: ignore[method-assign]
    served: list[int] = []
    sw.serve_with(lambda: served.append(sum(read)))
    sw.run(plan())
    assert read == [SERVED_BATCH, SERVED_BATCH, 10]
    assert served == [SERVED_BATCH, 2 * SERVED_BATCH, n]
