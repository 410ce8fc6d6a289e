"""Writing decisions into the flow map, and what happens when it is full.

The flow map is a preallocated hash of ``max_flows`` entries. When it is
full, an offloadable flow takes the room of a pass entry (pass entries only
save the kernel a ring notification; the connection comes back as pending
and is passed again when there is room). When no pass entry is left, the
tuple stays pending, so the kernel keeps forwarding it: a full map costs
offload, never connectivity. Refusals are counted, and logged once a minute.

Why each pass entry was written (its ``PassReason``) is kept for ``status``,
bounded: the last PASS_REASONS_KEPT passes, each forgotten when its entry
goes (swept, evicted, flushed, or replaced by an offload).
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterable

from .datapath import Datapath, FlowKey, Verdict
from .decision import PassReason
from .errors import MapError
from .records import Records
from .status import Counters

log = logging.getLogger(__name__)

LOG_EVERY_S = 60.0
PASS_REASONS_KEPT = 16384  # about 2 MB when full (52-byte keys, measured with tracemalloc)


class FlowTable:
    def __init__(self, dp: Datapath, counters: Counters, rec: Records) -> None:
        self.dp = dp
        self.counters = counters
        self.rec = rec
        self.evictable: list[bytes] = []  # pass entries the last sweep saw
        self.why: dict[bytes, PassReason] = {}  # raw key of a pass entry -> why it was passed
        # told the (key, value) of flows removed to hand them back (Sweeper.hand_back)
        self.handed_back: Callable[[list[tuple[bytes, bytes]]], None] = lambda _pairs: None
        self._logged = -LOG_EVERY_S

    def offload(self, key: FlowKey, verdict: Verdict) -> bool:
        """Write the verdict; False when the full map had no room for it."""
        return self.offload_packed(key.pack(), verdict.oif, verdict.pack(
            last_seen_ns=time.monotonic_ns()))

    def offload_packed(self, raw: bytes, oif: int, value: bytes) -> bool:
        """``offload`` with key and ofl_flow value packed (decision.VerdictPacker)."""
        # Not over an offloaded entry: a late ring record or event for a flow
        # decided already must not reset its counters.
        if not self._store(lambda: self.dp.offload_packed(raw, oif, value, replace=False),
                           evict=True):
            return False
        self.why.pop(raw, None)
        return True

    def mark_pass(self, key: FlowKey, why: PassReason) -> bool:
        """Mark ``key`` pass for ``why``; False when the map is full (it stays pending)."""
        if not self._store(lambda: self.dp.mark_pass(key), evict=False):
            return False
        raw = key.pack()
        self.why.pop(raw, None)  # re-inserted: the newest
        self.why[raw] = why
        if len(self.why) > PASS_REASONS_KEPT:
            del self.why[next(iter(self.why))]
        return True

    def forget(self, raw_keys: Iterable[bytes]) -> None:
        """These entries left the map (the sweep, a reconcile): their reasons go."""
        if self.why:
            for raw in raw_keys:
                self.why.pop(raw, None)

    def remove_where_dmac(self, mac: bytes) -> int:
        """Remove the flows sent to ``mac``; how many went."""
        rec = self.rec
        pairs = [(k, v) for k, v in self.dp.flows.items() if rec.dmac(v) == mac]
        keys = [k for k, _ in pairs]
        self.forget(keys)
        n = self.dp.flows.delete_batch(keys)
        self.handed_back(pairs)
        return n

    def clear(self) -> int:
        """Remove every flow and pending tuple; how many flows went."""
        n = self.dp.flows.clear()
        self.dp.settle_pending()
        self.dp.pending.clear()
        self.why.clear()
        return n

    def _store(self, write: Callable[[], object], *, evict: bool) -> bool:
        for attempt in range(2):
            try:
                write()
                return True
            except MapError as exc:
                if exc.errno != errno.E2BIG:
                    raise
            if attempt or not evict or not self._evict_pass_entry():
                break
        self.counters.map_full += 1
        if time.monotonic() - self._logged >= LOG_EVERY_S:
            self._logged = time.monotonic()
            log.warning("flow map full (%d entries): new connections stay with the kernel "
                        "(raise max_flows; %d refused so far)", self.dp.flows.max_entries,
                        self.counters.map_full)
        return False

    def _evict_pass_entry(self) -> bool:
        while self.evictable:
            raw = self.evictable.pop()
            self.why.pop(raw, None)
            if self.dp.flows.delete(raw):
                return True
        return False
