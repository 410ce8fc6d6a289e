"""The sweep's classification from map bytes alone, and the Sweeper against
a fake flow map (no BPF, no root)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator, Sequence

import pytest

from offloader.conntrack import raw_wire_id
from offloader.datapath import FlowKey, L2Header, Verdict, pass_value
from offloader.decision import Teardown
from offloader.errors import MapError
from offloader.layout import layout
from offloader.records import Records
from offloader.sweep import RefreshClass, Sweeper, SweepPlan, SweepResult, classify

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


def slot(sport: int, dport: int, slices: int) -> int:
    """The sweep a flow's refresh falls in: its ports as the key's bytes read
    in host order (the sweep only hashes them)."""
    return (socket.htons(sport) ^ socket.htons(dport)) % slices


def run(entries: list[tuple[FlowKey, bytes]], p: SweepPlan) -> SweepResult:
    kb = b"".join(k.pack() for k, _ in entries)
    vb = b"".join(v for _, v in entries)
    return classify(kb, vb, p, REC)


def test_tcp_flags_hand_the_flow_back() -> None:
    r = run([(key(), flow(key(), seen=1))], plan())
    assert r.remove == [key().pack()] and r.reasons == {Teardown.TCP_FLAGS: 1}


@pytest.mark.parametrize("proto, idle_s, gone", [
    (6, 299, False), (6, 301, True), (17, 59, False), (17, 61, True)])
def test_idle_per_protocol(proto: int, idle_s: int, gone: bool) -> None:
    k = key(proto)
    r = run([(k, flow(k, last=NOW - idle_s * NS))], plan())
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
def test_refresh_class_and_slice(proto: int, assured: bool, cls: RefreshClass) -> None:
    k = key(proto, sport=40000)
    p = plan()
    slices = p.slices(cls)
    due = slot(40000, 443, slices)
    found = [n for n in range(slices)
             if run([(k, flow(k, assured=assured, reply=True, zone=4))], plan(sweep_no=n)).refresh]
    assert found == [due]  # exactly once per period
    (ref,) = run([(k, flow(k, assured=assured, reply=True, zone=4))], plan(sweep_no=due)).refresh
    assert (ref.cls, ref.reply, ref.zone, ref.raw_key) == (cls, True, 4, k.pack())


def test_a_flow_idle_longer_than_the_period_is_not_refreshed() -> None:
    k = key(17)
    p = plan(sweep_no=slot(40000, 443, plan().slices(RefreshClass.UDP_NEW)))
    r = run([(k, flow(k, assured=False, last=NOW - 11 * NS))], p)  # UDP_NEW period: 10 s
    assert r.refresh == [] and r.remove == []


def test_periods_are_a_third_of_the_timeout_within_bounds() -> None:
    p = plan()
    assert p.period_s(RefreshClass.TCP) == 60.0
    assert p.period_s(RefreshClass.UDP) == 40.0
    assert p.period_s(RefreshClass.UDP_NEW) == 10.0
    assert SweepPlan(NOW, 0, 1, 1, {c: 1 for c in RefreshClass}, 1.0).period_s(
        RefreshClass.TCP) == 1.0


class FakeMap:
    def __init__(self, entries: list[tuple[FlowKey, bytes]], fail: bool = False) -> None:
        self.entries = {k.pack(): v for k, v in entries}
        self.fail = fail

    def batches(self) -> Iterator[tuple[bytes, bytes, int]]:
        if self.fail:
            raise MapError("lookup batch of ofl_flows", errno=22)
        items = list(self.entries.items())
        yield b"".join(k for k, _ in items), b"".join(v for _, v in items), len(items)

    def delete_batch(self, keys: list[bytes]) -> int:
        for k in keys:
            self.entries.pop(k, None)
        return len(keys)


class FakeConntrack:
    """Conntrack's keep-alive side: records refreshes; ``missing`` keys
    answer as gone (ENOENT), as the kernel does for a forgotten entry."""

    def __init__(self, missing: set[bytes] | None = None) -> None:
        self.sent: list[object] = []
        self.missing = missing or set()
        self.gone: list[bytes] = []

    def refresh_many(self, items: Sequence[tuple[tuple[int, bytes, bytes, int, int], bool, int,
                                                 int]],
                     tags: Sequence[bytes] | None = None) -> int:
        self.sent.extend(items)
        self.gone.extend(t for t in tags or () if t in self.missing)
        return len(items)

    def take_gone(self) -> list[bytes]:
        gone, self.gone = self.gone, []
        return gone


def test_sweeper_deletes_and_refreshes() -> None:
    gone, kept = key(sport=1), key(sport=2)
    fm = FakeMap([(gone, flow(gone, seen=1)), (kept, flow(kept))])
    ct = FakeConntrack()
    sw = Sweeper(fm, ct, REC)
    p = plan(sweep_no=slot(2, 443, plan().slices(RefreshClass.TCP)))
    result = sw.run(p)
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
