"""Early drop: which undecided tuples the datapath may drop before the kernel
sees them, and for how long.

The agent asks only about tuples that reached it twice (a ring record
re-announced after 150 ms, or the sweep's stuck pending tuples) and that
conntrack has no entry for in either direction. ``judge`` is pure: the
kernel's route lookup for the tuple, its pending counters, the thresholds
and what the ruleset allows in, a ``DropReason`` (or None) out:

  the route drops it silently (EINVAL: blackhole, martian)  -> ROUTE, at once
  learning not allowed (notrack/zone/queue rules, untracked family,
  conntrack nearly full, a bridged or multicast tuple)       -> nothing
  fewer than ``packets`` packets, or younger than ``after``   -> nothing (yet)
  the route answers with ICMP (unreachable, prohibit, none)  -> UNREACHABLE
  routed or delivered, but conntrack never confirmed it      -> LEARNED

docs/design.md ("Early drop") says why this cannot change what a
well-behaved peer sees.
"""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the status client imports this module: no pyroute2 there
    from .decision import DropReason
    from .routing import RouteLookup

CT_NEARLY_FULL = 0.9  # learning stops while conntrack holds more than this share of its max
SILENT = frozenset({errno.EINVAL})  # fib_props: blackhole; ip_route_input: martian source
ANSWERED = frozenset({errno.EHOSTUNREACH, errno.EACCES, errno.ENETUNREACH})  # ICMP errors
BUSIEST = 10  # dropped sources shown by status


@dataclass(frozen=True)
class Thresholds:
    packets: int  # at least this many packets ...
    after_ns: int  # ... and at least this long after the first
    drop_ns: int  # how long a drop lasts

    @classmethod
    def of(cls, *, packets: int, after_ms: int, drop_s: int) -> Thresholds:
        return cls(packets, after_ms * 1_000_000, drop_s * 1_000_000_000)


@dataclass(frozen=True)
class RulesetFacts:
    """What the nftables ruleset says about learning (offloader.nftwatch reads it)."""

    tracked: frozenset[int] = frozenset()  # families (AF_INET, AF_INET6) conntrack sees
    notrack: bool = False  # a rule may exempt packets from conntrack
    zones: bool = False  # a rule sets a conntrack zone (lookups in zone 0 would miss)
    queue: bool = False  # a rule queues packets to user space

    def refuses(self, family: int) -> str | None:
        """Why tuples of ``family`` may not be learned, or None."""
        if self.notrack:
            return "a notrack rule exists"
        if self.zones:
            return "a rule sets conntrack zones"
        if self.queue:
            return "a rule queues packets to user space"
        if family not in self.tracked:
            return "conntrack does not track this family"
        return None


def judge(route: RouteLookup, first_seen_ns: int, packets: int, now_ns: int, th: Thresholds,
          may_learn: bool) -> DropReason | None:
    """The drop for an undecided tuple without a conntrack entry, or None."""
    from .decision import DropReason  # noqa: PLC0415 (see the import above)

    if route.errno in SILENT:
        return DropReason.ROUTE
    if not may_learn or packets < th.packets or now_ns - first_seen_ns < th.after_ns:
        return None
    if route.errno in ANSWERED:
        return DropReason.UNREACHABLE
    if route.errno == 0 and route.learnable:
        return DropReason.LEARNED
    return None


def conntrack_nearly_full(base: Path = Path("/proc/sys/net/netfilter")) -> bool:
    """While the table is nearly full the kernel drops new connections for
    want of room, not by rule: such a tuple may be accepted a moment later."""
    try:
        count = int((base / "nf_conntrack_count").read_text())
        limit = int((base / "nf_conntrack_max").read_text())
    except (OSError, ValueError):
        return False
    return limit > 0 and count >= CT_NEARLY_FULL * limit


@dataclass
class DropCounts:
    """Tuples the agent put in the drop map, by reason."""

    by_reason: Counter[DropReason] = field(default_factory=Counter)
    forgotten: int = 0  # times every drop was forgotten (ruleset or route change)
    refused: str | None = None  # why learning is off right now, if it is

    def report(self) -> dict[str, object]:
        return {"dropped": {str(r): n for r, n in self.by_reason.items()},
                "drops_forgotten": self.forgotten, "drop_learning_off": self.refused}


def busiest_sources(rows: Iterable[tuple[str, int, int, int]], now_ns: int,
                    limit: int = BUSIEST) -> list[dict[str, object]]:
    """Sources of the live drop entries, most dropped packets first: rows
    are (source address, expires_ns, packets, bytes)."""
    packets: Counter[str] = Counter()
    nbytes: Counter[str] = Counter()
    tuples: Counter[str] = Counter()
    for src, expires, n, b in rows:
        if expires > now_ns:
            packets[src] += n
            nbytes[src] += b
            tuples[src] += 1
    return [{"src": src, "packets": n, "bytes": nbytes[src], "tuples": tuples[src]}
            for src, n in packets.most_common(limit)]


def drop_lines(status: dict[str, Any]) -> list[str]:
    """The human status report's early-drop part (from the JSON report)."""
    report = status.get("early_drop")
    if not report:
        return []
    by_reason = report["packets_by_reason"]
    total = sum(by_reason.values())
    agent = status.get("agent", {})
    lines = [f"early drop: {total} packets dropped ("
             + ", ".join(f"{r} {n}" for r, n in by_reason.items()) + f"), "
             f"{report['entries']} tuples now (max {report['entries_max']})"]
    if agent.get("drop_learning_off"):
        lines.append(f"  learning off: {agent['drop_learning_off']} (route drops only)")
    for row in report["busiest_sources"][:5]:
        lines.append(f"  {row['src']}: {row['packets']} packets dropped, {row['tuples']} tuples")
    return lines
