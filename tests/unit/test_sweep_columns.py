"""The sweep's whole-batch tests (records.Columns, the refresh candidates'
translate) against a brute-force walk of the same entries, and the walk's
refreshes gathered into few sends (no BPF, no root)."""

from __future__ import annotations

import random
import socket
import struct
import sys
from collections.abc import Iterator, Sequence

import pytest

from offloader.datapath import FlowKey
from offloader.decision import Teardown
from offloader.layout import layout
from offloader.records import Columns, Records
from offloader.sweep import SERVED_BATCH, RefreshClass, Sweeper, SweepPlan, classify

from .test_sweep import NOW, NS, TIMEOUTS, FakeConntrack, flow, ip

REC = Records()


def entries(n: int, seed: int, *, lasts: Sequence[int] | None = None,
            ports: Sequence[tuple[int, int]] | None = None) -> tuple[bytes, bytes]:
    """``n`` offloaded unreplied UDP flows, as a batch's key and value bytes."""
    rnd = random.Random(seed)
    keys, values = [], []
    for i in range(n):
        sport, dport = ports[i] if ports else (rnd.randrange(1, 65536), rnd.randrange(1, 65536))
        k = FlowKey(2, socket.AF_INET, 17, ip("198.18.1.2"), ip("198.19.2.2"), sport, dport)
        keys.append(k.pack())
        values.append(flow(k, assured=False,
                           last=lasts[i] if lasts else NOW - rnd.randrange(0, 3 * NS)))
    return b"".join(keys), b"".join(values)


def stamps(vb: bytes) -> list[int]:
    fs = REC.flow_size
    return [struct.unpack_from("=Q", vb, i * fs + REC.f_last)[0] for i in range(len(vb) // fs)]


@pytest.mark.parametrize("seed", range(20))
def test_lasts_at_least_answers_as_a_walk_would(seed: int) -> None:
    rnd = random.Random(seed)
    base = rnd.randrange(1, 1 << 62)
    values = [base + rnd.randrange(-5, 6) for _ in range(rnd.randrange(1, 300))]
    if seed % 4 == 0:
        values[rnd.randrange(len(values))] = 0  # a stamp never written
    kb, vb = entries(len(values), seed, lasts=values)
    cols = Columns(REC, kb, vb)
    for bound in (base - 6, base - 1, base, base + 1, base + 6, min(values), max(values),
                  max(values) + 1):
        assert cols.lasts_at_least(bound) == all(v >= bound for v in values), bound


def test_lasts_at_least_outside_the_clock_range_is_left_to_the_walk() -> None:
    kb, vb = entries(3, 1, lasts=[1 << 63, 5, 6])
    assert not Columns(REC, kb, vb).lasts_at_least(4)  # would be True, but not decided here
    kb, vb = entries(2, 1, lasts=[5, 6])
    assert Columns(REC, kb, vb).lasts_at_least(-10)
    assert not Columns(REC, kb, vb).lasts_at_least(1 << 63)


def test_columns_are_the_fields_of_every_entry() -> None:
    kb, vb = entries(SERVED_BATCH, 7)
    cols = Columns(REC, kb, vb)
    ks, fs = REC.key_size, REC.flow_size
    assert list(cols.lasts) == stamps(vb)
    assert list(cols.states) == [struct.unpack_from("=I", vb, i * fs + REC.f_state)[0]
                                 for i in range(SERVED_BATCH)]
    native = "<" if sys.byteorder == "little" else ">"
    ports = [struct.unpack_from(native + "HH", kb, i * ks + REC.k_sport) for i in range(SERVED_BATCH)]
    hashes, high = cols.port_hashes()
    assert list(hashes) == [a ^ b for a, b in ports]
    assert list(high) == [h >> 8 for h in hashes]
    assert cols.all_equal(cols.states, REC.state_offload) and cols.all_equal(cols.seens, 0)
    one = bytearray(vb)
    one[5 * fs + REC.f_seen] = 1
    assert not Columns(REC, kb, bytes(one)).all_equal(Columns(REC, kb, bytes(one)).seens, 0)


@pytest.mark.parametrize("seed", range(6))
def test_refreshes_are_exactly_the_due_active_entries(seed: int) -> None:
    """The candidates are picked by the hashes' high bytes; the result must
    be what testing every entry's hash against its class's table gives."""
    now = NOW + seed * 37 * NS
    rnd = random.Random(seed)
    kb, vb = entries(SERVED_BATCH, seed, lasts=[now - rnd.randrange(0, 3 * NS)
                                                for _ in range(SERVED_BATCH)])
    p = SweepPlan.at(now, 1, tcp_idle_s=7200, udp_idle_s=600,
                     timeouts=TIMEOUTS, interval_s=7.5 + seed, dead=set())
    got = [r.raw_key for r in classify(kb, vb, p, REC).refresh]
    _cls, due, since = p.schedule(RefreshClass.UDP_NEW)
    hashes, _ = Columns(REC, kb, vb).port_hashes()
    ks = REC.key_size
    want = [kb[i * ks : (i + 1) * ks] for i, (h, last) in enumerate(zip(hashes, stamps(vb),
                                                                         strict=True))
            if due[h] and last > since]
    assert want and got == want


def test_one_idle_entry_in_a_batch_is_found_and_only_it() -> None:
    lasts = [NOW - NS] * SERVED_BATCH
    lasts[100] = NOW - 31 * NS  # unreplied UDP: conntrack's own 30 s
    kb, vb = entries(SERVED_BATCH, 3, lasts=lasts)
    p = SweepPlan.at(NOW, 1, tcp_idle_s=7200, udp_idle_s=600, timeouts=TIMEOUTS,
                     interval_s=1.0, dead=set())
    r = classify(kb, vb, p, REC)
    ks = REC.key_size
    assert r.remove == [kb[100 * ks : 101 * ks]] and r.reasons == {Teardown.IDLE: 1}


def test_one_passed_entry_in_a_batch_is_room_for_offloadable_flows() -> None:
    kb, vb = entries(SERVED_BATCH, 4)
    fs, ks = REC.flow_size, REC.key_size
    passed = bytearray(vb)
    struct.pack_into("=I", passed, 9 * fs + REC.f_state, layout().consts["OFL_STATE_PASS"])
    p = SweepPlan.at(NOW, 1, tcp_idle_s=7200, udp_idle_s=600, timeouts=TIMEOUTS,
                     interval_s=1.0, dead=set())
    assert classify(kb, bytes(passed), p, REC).pass_keys == [kb[9 * ks : 10 * ks]]
    assert classify(kb, vb, p, REC).pass_keys == []


class BatchMap:
    def __init__(self, kb: bytes, vb: bytes) -> None:
        self.kb, self.vb = kb, vb

    def batches(self, batch: int = SERVED_BATCH) -> Iterator[tuple[bytes, bytes, int]]:
        ks, fs = REC.key_size, REC.flow_size
        n = len(self.vb) // fs
        for i in range(0, n, batch):
            j = min(n, i + batch)
            yield self.kb[i * ks : j * ks], self.vb[i * fs : j * fs], j - i

    def delete_batch(self, keys: list[bytes]) -> int:
        return len(keys)

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        raise AssertionError("not in this test")


class CountingConntrack(FakeConntrack):
    def __init__(self) -> None:
        super().__init__()
        self.sends: list[int] = []

    def refresh_keys(self, items: Sequence[tuple[bytes, bytes, bytes, bytes, int, bool, int, int]],
                     tags: Sequence[bytes]) -> int:
        self.sends.append(len(items))
        return super().refresh_keys(items, tags)


def test_the_walk_gathers_its_refreshes_into_few_sends() -> None:
    """In a steady pass a batch has a few refreshes due: the walk's go out
    together at its end (up to 256 to a send), not a send per batch."""
    kb, vb = entries(2000, 5, lasts=[NOW + 4 * NS] * 2000)
    ct = CountingConntrack()
    sw = Sweeper(BatchMap(kb, vb), ct, REC)
    sw.serve_with(lambda: None)  # the agent's batches of SERVED_BATCH

    def tick(now: int) -> None:
        sw.run(SweepPlan.at(now, 1, tcp_idle_s=7200, udp_idle_s=600, timeouts=TIMEOUTS,
                            interval_s=1.0, dead=set()))

    tick(NOW)  # the first pass: all 2,000 due
    assert sum(ct.sends) == 2000 == sw.refreshed and max(ct.sends) < 256 + SERVED_BATCH
    ct.sends.clear()
    tick(NOW + 5 * NS)  # 5 s of 150 s of slices: a few dozen, over 8 batches
    assert len(ct.sends) == 1 and 0 < ct.sends[0] < 256
