"""Early drop's route lookups are bounded per second: a sweep that finds
hundreds of stuck tuples without a conntrack entry judges 64 of them, the
rest stay pending (with the kernel) and are judged later."""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Any

from offloader.config import Settings
from offloader.datapath import FlowKey
from offloader.drops import RulesetFacts
from offloader.earlydrop import LOOKUPS_PER_S, EarlyDrop
from offloader.routing import RouteLookup

ip = ipaddress.ip_address


class FakeDatapath:
    def __init__(self) -> None:
        self.dropped: list[FlowKey] = []

    def pending_entry(self, key: FlowKey) -> tuple[int, int]:
        return 0, 1  # first seen, packets

    def add_drop(self, key: FlowKey, *args: Any) -> None:
        self.dropped.append(key)


class BlackholeResolver:
    def __init__(self) -> None:
        self.lookups = 0

    def lookup(self, key: FlowKey) -> RouteLookup:
        self.lookups += 1
        return RouteLookup(errno.EINVAL, 2, b"\0" * 6, False)  # a blackhole route


def test_route_lookups_are_bounded_per_second(monkeypatch: Any) -> None:
    dp, resolver = FakeDatapath(), BlackholeResolver()
    ed = EarlyDrop(dp, resolver)  # type: ignore[arg-type]
    now = [10_000_000_000]
    monkeypatch.setattr("offloader.earlydrop.time.monotonic_ns", lambda: now[0])
    facts = RulesetFacts(tracked=frozenset({socket.AF_INET}))
    keys = [FlowKey(2, socket.AF_INET, 17, ip("198.18.1.2"), ip("198.51.100.1"), p, 53)
            for p in range(1000, 1000 + LOOKUPS_PER_S + 20)]
    got = [ed.consider(k, Settings(), facts) for k in keys]
    assert resolver.lookups == LOOKUPS_PER_S
    assert len(dp.dropped) == LOOKUPS_PER_S and got[LOOKUPS_PER_S:] == [None] * 20
    now[0] += 1_000_000_000  # a second later the rest are judged
    assert all(ed.consider(k, Settings(), facts) for k in keys[LOOKUPS_PER_S:])
