"""Reconcile the flow map with conntrack after conntrack events were lost.

When the event socket overflows (ENOBUFS) some DESTROY events are gone, and
the flows of those connections would keep bypassing the firewall. The
reconciler takes the flow map's keys at that moment, dumps conntrack (every
family and zone) on its own non-blocking socket, a budget of datagrams per
wake-up, and crosses off every flow whose connection the dump shows. What
is left at the end has no conntrack entry: those flows go.

The cost is bounded: two passes over the flow map's keys and one dump. A
connection created during the dump is not in the snapshot, so it is never
judged; an entry the dump missed (NLM_F_DUMP_INTR under churn) only costs
its flow a re-offload.

The snapshot holds no Python object per flow (``Shown``): at 100,000 flows a
dict of wire ids to lists of raw keys took some 27 MB of small objects, and
the agent's RSS stayed 18 MB higher after the reconcile (docs/performance.md,
"Memory"), the allocator's arenas pinned by whatever lived among them.

The same overflow lost NEW events, and a tuple waiting for its NEW event
(its ring record read, the event not) was found only by the sweep's stuck
queries, 512 a second: in a burst of 20,000 new flows a second that left
most of them undecided. The dump lists those connections too, so an entry
of a connection with a waiting tuple is handed on as the lost event would
have been (``found``); every other entry costs two dictionary lookups.
"""

from __future__ import annotations

import logging
import socket
from array import array
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from pyroute2.netlink import NETLINK_NETFILTER

from . import ctnetlink
from .conntrack import Conntrack, CtEvent, event_entry, raw_wire_id
from .datapath import Datapath
from .flowstate import key_tuple
from .layout import layout
from .records import Records

log = logging.getLogger(__name__)

READ_BUDGET = 8  # dump datagrams (64 KiB, some 300 entries each) per wake-up


Found = Callable[[list[CtEvent]], None]


def _nothing_waits(_wire: bytes) -> bool:
    return False


_HASH = (1 << 63) - 1
_SHOWN = 1 << 63


def _hash(wire: bytes) -> int:
    return (hash(wire) & _HASH) or 1  # 0 marks a free slot


class Shown:
    """Which connection directions of a snapshot a dump has shown, in one
    array: the 63-bit hash of each flow's wire id in an open-addressing
    table (linear probing, at most half full, 8 bytes a slot), the top bit
    set once the dump lists that direction. Two wire ids with the same hash
    (odds about n * m / 2**63) make a gone flow look shown: it stays until
    its next conntrack refresh finds the entry gone."""

    __slots__ = ("slots", "mask", "used")

    def __init__(self, wires: Iterable[bytes] = ()) -> None:
        self.slots = array("Q", [0]) * 1024
        self.mask = len(self.slots) - 1
        self.used = 0
        for wire in wires:
            self.add(wire)

    def add(self, wire: bytes) -> None:
        """A flow of the snapshot (several flows may share a direction)."""
        if 2 * (self.used + 1) > len(self.slots):
            old = self.slots
            self.slots = array("Q", [0]) * (2 * len(old))
            self.mask = len(self.slots) - 1
            for v in old:
                if v:
                    self._put(v)
        self._put(_hash(wire))
        self.used += 1

    def _put(self, v: int) -> None:
        slots, mask = self.slots, self.mask
        i = v & mask
        while slots[i]:
            i = (i + 1) & mask
        slots[i] = v

    def show(self, wire: bytes) -> None:
        """The dump lists this direction: every flow with it is crossed off."""
        h = _hash(wire)
        slots, mask = self.slots, self.mask
        i = h & mask
        while v := slots[i]:
            if v & _HASH == h:
                slots[i] = v | _SHOWN
            i = (i + 1) & mask

    def state(self, wire: bytes) -> bool | None:
        """True: shown; False: in the snapshot and not shown; None: not in it."""
        h = _hash(wire)
        slots, mask = self.slots, self.mask
        i = h & mask
        found = None
        while v := slots[i]:
            if v & _HASH == h:
                if v & _SHOWN:
                    return True
                found = False
            i = (i + 1) & mask
        return found


class Reconciler:
    def __init__(self, flows: KeySource, rec: Records, seq: int = 1, *,
                 waits: Callable[[bytes], bool] = _nothing_waits,
                 found: Found | None = None) -> None:
        """``flows``: the flow map, read now (the snapshot) and again once
        the dump is complete. ``found`` is handed, as NEW events, the dumped
        entries of the connections ``waits`` names (by either direction's
        wire id)."""
        self.flows, self.rec = flows, rec
        self.waits, self.found = waits, found
        self.shown = Shown(rec.wire(k) for k in _keys(flows, rec.key_size))
        log.info("conntrack events lost: reconciling %d flows with conntrack", self.shown.used)
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.families = [socket.AF_INET, socket.AF_INET6]
        self.seq = seq
        self.interrupted = False
        self.running = True
        self._request()

    def fileno(self) -> int:
        return self.sock.fileno()

    def _request(self) -> None:
        self.sock.send(ctnetlink.encode_dump(self.seq, self.families[0]))

    def read(self) -> list[bytes] | None:
        """Read what is queued; the raw keys of flows without a conntrack
        entry once the dump is complete, else None."""
        for _ in range(READ_BUDGET):
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return None
            except OSError:
                self.running = False  # ENOBUFS: the dump is incomplete, nothing judged
                raise
            events: list[CtEvent] = []
            for msg in ctnetlink.decode(data):
                if isinstance(msg, ctnetlink.Decoded):
                    ids = [raw_wire_id(t) for t in (msg.orig, msg.reply) if t is not None]
                    for wire in ids:
                        self.shown.show(wire)
                    if len(ids) == 2 and (self.waits(ids[0]) or self.waits(ids[1])):
                        entry = event_entry(msg)
                        if entry is not None:
                            events.append(CtEvent("new", entry, ids[0], ids[1]))
                elif isinstance(msg, ctnetlink.Done):
                    self.interrupted |= msg.interrupted
                    self.families.pop(0)
                    if self.families:
                        self.seq += 1
                        self._request()
                    else:
                        self.running = False
                        self._hand_on(events)
                        gone = self._gone()
                        log.info("reconciled with conntrack: %d flows had no entry", len(gone))
                        return gone
                elif msg.error:
                    self.running = False
                    raise OSError(-msg.error, "conntrack dump refused")
            self._hand_on(events)
        return None

    def _gone(self) -> list[bytes]:
        """The flows of the snapshot still in the map whose direction the
        dump did not show (flows added since the snapshot are not judged)."""
        state, wire = self.shown.state, self.rec.wire
        return [k for k in _keys(self.flows, self.rec.key_size) if state(wire(k)) is False]

    def _hand_on(self, events: list[CtEvent]) -> None:
        if events and self.found is not None:
            self.found(events)

    def close(self) -> None:
        self.sock.close()


class Reconciliation:
    """At most one reconcile at a time: a loss asks for one (``wanted``),
    the next sweep starts it (``tick``), losses meanwhile start another
    after it (a dump may have listed entries destroyed since). Its socket
    is watched by the loop while it runs; the flows it finds without an
    entry go to ``on_gone``."""

    def __init__(self, flows: KeySource, rec: Records, watch: Callable[[int, Callable[[], None]], None],
                 unwatch: Callable[[int], None], on_gone: Callable[[list[bytes]], None], *,
                 waits: Callable[[bytes], bool] = _nothing_waits,
                 found: Found | None = None) -> None:
        self.flows, self.rec = flows, rec
        self.waits, self.found = waits, found
        self.watch, self.unwatch, self.on_gone = watch, unwatch, on_gone
        self.running: Reconciler | None = None
        self._wanted = False

    def wanted(self) -> None:
        self._wanted = True

    def tick(self) -> None:
        if self._wanted and self.running is None:
            self._wanted = False
            self.running = Reconciler(self.flows, self.rec, waits=self.waits, found=self.found)
            self.watch(self.running.fileno(), self._readable)

    def _readable(self) -> None:
        rec = self.running
        if rec is None:
            return
        try:
            gone = rec.read()
        finally:
            if not rec.running:
                self.stop()
        if gone is not None:
            self.on_gone(gone)

    def stop(self) -> None:
        if self.running is not None:
            self.unwatch(self.running.fileno())
            self.running.close()
            self.running = None


class KeySource(Protocol):
    def batches(self) -> Iterator[tuple[bytes, bytes, int]]: ...


def _keys(flows: KeySource, key_size: int) -> Iterator[bytes]:
    """The map's raw keys, one batch's worth in memory at a time."""
    for kb, _vb, n in flows.batches():
        for i in range(n):
            yield kb[i * key_size : (i + 1) * key_size]


def adopt(dp: Datapath, ct: Conntrack, rec: Records) -> None:
    """At start: keep what a previous run offloaded if conntrack still has it."""
    stale = []
    adopted = 0
    for entry in dp.flow_entries():
        if ct.get(key_tuple(entry.key), rec.zone(entry.raw)) is None:
            stale.append(entry.key)
        else:
            adopted += 1
            if entry.state == layout().consts["OFL_STATE_OFFLOAD"]:
                dp.add_tx_port(entry.oif)
    if stale:
        dp.remove(stale)
    if adopted or stale:
        log.info("adopted %d flows from a previous run, dropped %d stale", adopted, len(stale))
