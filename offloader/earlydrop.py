"""Early drop: for a pending tuple conntrack has no entry for, whether to
drop it in XDP (the learning rule itself is drops.py's ``judge``)."""

from __future__ import annotations

import logging
import time

from .config import Settings
from .datapath import Datapath, FlowKey
from .decision import DropReason
from .drops import DropCounts, RulesetFacts, Thresholds, conntrack_nearly_full, judge
from .flowstate import describe
from .routing import Resolver

log = logging.getLogger(__name__)


LOOKUPS_PER_S = 64  # route lookups (pyroute2, about 0.5 ms each) for drop judgements a second


class EarlyDrop:
    def __init__(self, dp: Datapath, resolver: Resolver) -> None:
        self.dp = dp
        self.resolver = resolver
        self.counts = DropCounts()
        self._window_ns = 0
        self._lookups = 0

    def _may_look_up(self, now_ns: int) -> bool:
        """At most LOOKUPS_PER_S route lookups a second: after a burst whose
        conntrack events were lost, hundreds of stuck tuples without an
        entry (expired meanwhile) reach this in one sweep; the rest stay
        pending, with the kernel, and are judged when they come back."""
        if now_ns - self._window_ns >= 1_000_000_000:
            self._window_ns, self._lookups = now_ns, 0
        self._lookups += 1
        return self._lookups <= LOOKUPS_PER_S

    def consider(self, key: FlowKey, settings: Settings,
                 ruleset: RulesetFacts) -> DropReason | None:
        """Put ``key`` in the drop map if the kernel keeps dropping it;
        the reason, or None (it stays pending, with the kernel)."""
        pending = self.dp.pending_entry(key) if settings.early_drop else None
        if pending is None or not self._may_look_up(time.monotonic_ns()):
            return None
        refused = ruleset.refuses(key.family) or (
            "conntrack nearly full" if conntrack_nearly_full() else None)
        self.counts.refused = refused
        route = self.resolver.lookup(key)
        now = time.monotonic_ns()
        th = Thresholds.of(packets=settings.early_drop_packets,
                           after_ms=settings.early_drop_after_ms, drop_s=settings.early_drop_time)
        reason = judge(route, pending[0], pending[1], now, th, refused is None)
        if reason is None:
            return None
        self.dp.add_drop(key, reason.wire, now + th.drop_ns, route.l3_mac)
        self.counts.by_reason[reason] += 1
        log.debug("drop %s: %s", describe(key), reason)
        return reason

    def forget(self) -> None:
        """The ruleset or the routes changed: every drop may be wrong now."""
        self.dp.drops.clear()
        self.counts.forgotten += 1
