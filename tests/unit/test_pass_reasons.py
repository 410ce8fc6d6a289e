"""Why each passed flow was passed: kept by the FlowTable per pass entry,
bounded, forgotten when the entry goes, and shown by ``status`` for that
flow (JSON and text).

FAKES, not BPF: the flow map is a dict with the map's operations; entries
are the real records (Verdict.pack, pass_value), read back by the real
``Datapath.flow_entries``. The end-to-end proof is
tests/integration/test_multiwan.py (a per-packet mark).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from offloader import flowtable
from offloader.cli import render_status
from offloader.datapath import Datapath, FlowEntry, FlowKey, L2Header, Verdict, pass_value
from offloader.decision import PassReason
from offloader.flowtable import FlowTable
from offloader.layout import layout
from offloader.records import Records
from offloader.status import AgentFacts, Counters, build_status
from offloader.sweep import RefreshClass, Sweeper, SweepPlan

REC = Records()


def key(sport: int) -> FlowKey:
    return FlowKey(2, socket.AF_INET, socket.IPPROTO_UDP, ipaddress.ip_address("198.18.1.2"),
                   ipaddress.ip_address("198.19.99.1"), sport, 9002)


class FakeMap:
    max_entries = 1024

    def __init__(self) -> None:
        self.entries: dict[bytes, bytes] = {}

    def update(self, k: bytes, v: bytes, flags: int = 0) -> None:
        self.entries[k] = v

    def delete(self, k: bytes) -> bool:
        return self.entries.pop(k, None) is not None

    def delete_batch(self, keys: list[bytes]) -> int:
        return sum(self.delete(k) for k in keys)

    def clear(self) -> int:
        n = len(self.entries)
        self.entries.clear()
        return n

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(list(self.entries.items()))

    def batches(self) -> Iterator[tuple[bytes, bytes, int]]:
        items = list(self.entries.items())
        yield b"".join(k for k, _ in items), b"".join(v for _, v in items), len(items)


class FakeDatapath:
    """The few Datapath operations the FlowTable and the report use."""

    def __init__(self) -> None:
        self.flows = FakeMap()
        self.pending = FakeMap()
        self.drops = FakeMap()
        self.layout = layout()
        self.pin_dir: Path | None = None

    def offload_packed(self, raw: bytes, oif: int, value: bytes, *,
                       replace: bool = True) -> bool:
        self.flows.update(raw, value)
        return True

    def mark_pass(self, k: FlowKey) -> None:
        self.flows.update(k.pack(), pass_value())

    def flow_entries(self) -> Iterator[FlowEntry]:
        return Datapath.flow_entries(self)  # type: ignore[arg-type]  # the real reader

    def pending_entries(self) -> Iterator[tuple[FlowKey, int, int, int]]:
        return iter(())

    def drop_entries(self) -> Iterator[Any]:
        return iter(())

    def settle_pending(self) -> int:
        return 0  # nothing decided is left in this fake's pending map

    def stats(self) -> dict[str, int]:
        return {"event_drop": 0}


def verdict(k: FlowKey) -> Verdict:
    return Verdict(oif=3, l2=L2Header(b"\x02" * 6, b"\x04" * 6), mtu=1500, key=k)


def report(dp: FakeDatapath, table: FlowTable) -> dict[tuple[int, str], Any]:
    facts = AgentFacts(1, 0.0, [], {}, {"n": 0}, why=table.why)
    st = build_status(dp, facts, lambda i: f"if{i}")  # type: ignore[arg-type]
    return {(f["sport"], f["state"]): f.get("why", "absent") for f in st["flows"]}


def test_status_names_the_reason_of_each_passed_flow() -> None:
    dp = FakeDatapath()
    table = FlowTable(dp, Counters(), REC)  # type: ignore[arg-type]
    assert table.mark_pass(key(1), PassReason.POLICY_MARK)
    assert table.mark_pass(key(2), PassReason.HELPER)
    assert table.offload(key(3), verdict(key(3)))
    dp.mark_pass(key(4))  # a pass entry the agent did not write (adopted from an earlier agent)
    assert report(dp, table) == {(1, "passed"): "policy-mark", (2, "passed"): "helper",
                                 (3, "offloaded"): "absent", (4, "passed"): None}


def test_a_reason_goes_with_its_entry() -> None:
    dp = FakeDatapath()
    table = FlowTable(dp, Counters(), REC)  # type: ignore[arg-type]
    for sport in (1, 2, 3):
        table.mark_pass(key(sport), PassReason.POLICY_MARK)
    # Conntrack destroyed connection 1: the sweep removes its entry and says so.
    sweeper = Sweeper(dp.flows, _NoConntrack(), REC, on_remove=table.forget)
    k1 = key(1)
    dead = {REC.wire(k1.pack())}
    sweeper.run(SweepPlan(now_ns=10**12, sweep_no=0, tcp_idle_ns=300 * 10**9,
                          udp_idle_ns=60 * 10**9, timeouts=dict.fromkeys(RefreshClass, 60),
                          interval_s=1.0, dead=dead))
    assert k1.pack() not in dp.flows.entries
    assert set(table.why) == {key(2).pack(), key(3).pack()}
    # Offloaded after all (a changed ruleset let it go): no reason left.
    table.offload(key(2), verdict(key(2)))
    assert set(table.why) == {key(3).pack()}
    table.clear()
    assert table.why == {}


def test_the_reasons_kept_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flowtable, "PASS_REASONS_KEPT", 4)
    dp = FakeDatapath()
    table = FlowTable(dp, Counters(), REC)  # type: ignore[arg-type]
    for sport in range(1, 11):
        table.mark_pass(key(sport), PassReason.UDP_DISABLED)
    assert list(table.why) == [key(s).pack() for s in (7, 8, 9, 10)]  # the newest


def test_text_report_lists_passed_flows_with_why() -> None:
    st = {"pid": 1, "uptime_s": 1.0, "interfaces": [],
          "counts": {"offloaded": 0, "passed": 1, "pending": 0, "total": 1},
          "flows": [{"family": "ipv4", "proto": "udp", "src": "198.18.1.2", "dst": "198.19.99.1",
                     "sport": 5000, "dport": 9002, "state": "passed", "packets": 0, "bytes": 0,
                     "in_dev": "lan1p", "why": "policy-mark"}]}
    text = render_status(st, None, 0)
    assert "flows passed to the kernel, and why:" in text
    row = next(line for line in text.splitlines() if "198.18.1.2:5000" in line)
    assert "198.19.99.1:9002" in row and "lan1p" in row and row.rstrip().endswith("policy-mark")


class _NoConntrack:
    def refresh_many(self, items: Any, tags: Any = None) -> int:
        return 0

    def take_gone(self) -> list[bytes]:
        return []

    def take_offloaded(self) -> list[tuple[bytes, bool, int, bool]]:
        return []

    def put_back(self, items: Any) -> int:
        return 0
