"""``status --limit N`` picks the busiest flows from the maps' raw columns:
the same rows and counts as the full report cut to N."""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterator
from typing import Any

from offloader.datapath import Datapath, FlowKey, L2Header, Verdict, pass_value
from offloader.layout import layout
from offloader.status import AgentFacts, build_status

ip = ipaddress.ip_address


class RawMap:
    """A map read in batches of ``batch`` entries, as BPF_MAP_LOOKUP_BATCH gives them."""

    def __init__(self, rows: dict[bytes, bytes], batch: int = 7) -> None:
        self.rows, self.batch, self.max_entries = rows, batch, 1024

    def batches(self) -> Iterator[tuple[bytes, bytes, int]]:
        items = list(self.rows.items())
        for i in range(0, len(items), self.batch):
            part = items[i : i + self.batch]
            yield b"".join(k for k, _ in part), b"".join(v for _, v in part), len(part)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        yield from self.rows.items()


class FakeDatapath:
    def __init__(self, flows: dict[bytes, bytes], pending: dict[bytes, bytes]) -> None:
        self.flows, self.pending = RawMap(flows), RawMap(pending)
        self.drops = RawMap({})
        self.layout, self.pin_dir = layout(), None

    flow_entries = Datapath.flow_entries
    pending_entries = Datapath.pending_entries

    def drop_entries(self) -> list[Any]:
        return []

    def settle_pending(self) -> int:
        return 0  # nothing decided is left in this fake's pending map

    def stats(self) -> dict[str, int]:
        return {"event_drop": 0}


def with_counters(value: bytes, packets: int, nbytes: int) -> bytes:
    lay = layout()
    f = lay.from_bytes("struct ofl_flow", value)
    f.packets, f.bytes = packets, nbytes
    return lay.to_bytes(f)


def test_a_limited_report_is_the_full_one_cut() -> None:
    flows: dict[bytes, bytes] = {}
    pending: dict[bytes, bytes] = {}
    for port in range(1, 60):
        k = FlowKey(2, socket.AF_INET, 17, ip("198.18.1.2"), ip("198.19.2.2"), port, 53)
        if port % 5 == 0:  # pending: first seen, last notify, packets, bytes
            pending[k.pack()] = struct.pack("=QQQQ", 1, 1, 1, port * 997 % 1000)
            continue
        value = (pass_value() if port % 3 == 0 else
                 Verdict(3, L2Header(b"\1" * 6, b"\2" * 6), 1500, k).pack())
        flows[k.pack()] = with_counters(value, port, port * 7919 % 10007)
    dp = FakeDatapath(flows, pending)
    facts = AgentFacts(1, 0.0, [], {}, {"n": 0})
    full = build_status(dp, facts, str)  # type: ignore[arg-type]
    for limit in (1, 5, 50, 100):
        cut = build_status(dp, facts, str, limit)  # type: ignore[arg-type]
        assert cut["counts"] == full["counts"]
        assert [f["bytes"] for f in cut["flows"]] == [f["bytes"] for f in full["flows"][:limit]]
        assert cut["flows"] == full["flows"][:limit]
    assert full["counts"] == {"offloaded": 32, "passed": 16, "pending": 11, "total": 59}
