"""The sweep: the flow map's garbage collector and conntrack's keep-alive.

Each tick the sweep reads its share of a pass over the flow map in batches
(the whole map below ``ENTRIES_PER_TICK`` entries, see ``Sweeper``) and
classifies every entry it reads from its bytes alone:

  - hand back (``Teardown``): the datapath saw FIN/RST/SYN, the flow idled
    past its protocol's timeout, or conntrack destroyed or closed it;
  - refresh: an offloaded flow that carried traffic and whose slice of the
    refresh period is due gets its conntrack timeout renewed, with the
    long timeout of its class (``RefreshClass``, ``SweepPlan.keep_s``);
  - young (OFL_V_YOUNG, a new UDP flow's verdict): its conntrack entry still
    has the kernel's own timeout. At a due instant of that timeout's period
    it is renewed if it carried a packet since it was offloaded, or handed
    back when no later instant would come in time; a flow that ends with
    its reply (DNS) costs conntrack no message at all (``_young``).

``classify`` is pure (bytes, a clock and a plan in, actions out), so it is
tested without BPF or root. ``Sweeper`` is handed the map and the refresh
call, applies the actions, and never raises: a failed pass is logged and
the next tick tries again.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import compress, islice
from pathlib import Path
from typing import NamedTuple, Protocol

from .bpfobj import BPF_EXIST
from .decision import Teardown
from .errors import MapError, OffloadError
from .handback import Handback, Held, RefreshClass
from .loop import ServedBetween
from .records import Columns, Records

log = logging.getLogger(__name__)

NS = 1_000_000_000
PASS_KEYS_KEPT = 4096  # pass entries remembered as room for offloadable flows
BULK_BYTES = 1 << 20  # hybrid: a TCP flow that carried this much ...
BULK_PACKET = 1000  # ... in packets this large on average is bulk: TC forwards it
ENTRIES_PER_TICK = 20000  # a pass over a larger map is spread over ticks ...
MAX_PASS_TICKS = 5  # ... but never over more than this many
REFRESH_SPARE_S = 15.0  # a refresh period leaves at least this much of the timeout to spare
OFFLOAD_TIMEOUT_S = 300  # an offloaded flow's conntrack timeout (at least its class's own)
MAX_PERIOD_S = 150.0  # the longest refresh period
OFFLOADED_KEPT = 65536  # flows offloaded since the last tick whose long timeout is still due
FRESH_CHUNK = 64  # new flows' first renewals sent at once, the loop served between
# Flow-map entries read and judged at once, the loop served between. At 1,024
# a batch held the loop about 10 ms on the lab's machine, and the new flows
# arriving meanwhile waited behind it (p99 setup 17-19 ms at 2,000 a second);
# at 256, 2.5-7 ms a batch, the longest stretch left at 5,000 a second.
SERVED_BATCH = 128
# Refreshes the walk gathers over its batches before one send (one
# sendmsg() and one read of the answers, Conntrack.refresh_keys): a batch
# of SERVED_BATCH entries has a dozen due in a steady state.
REFRESH_SEND = 256
IDS_KEPT = 16384  # destroyed or re-marked connections carried over; beyond, a pass ends at once
FIRST_WINDOW_S = 3600.0  # the first pass: every active flow is due (nothing was read before)


_SYSCTL = {RefreshClass.TCP: ("nf_conntrack_tcp_timeout_established", 432000),
           RefreshClass.UDP: ("nf_conntrack_udp_timeout_stream", 120),
           RefreshClass.UDP_NEW: ("nf_conntrack_udp_timeout", 30)}


def conntrack_timeouts(base: Path = Path("/proc/sys/net/netfilter")) -> dict[RefreshClass, int]:
    """The conntrack timeouts this namespace uses (read, never changed: no
    global sysctl is touched)."""
    out = {}
    for cls, (name, default) in _SYSCTL.items():
        try:
            out[cls] = int((base / name).read_text())
        except (OSError, ValueError):
            out[cls] = default
    return out


class Refresh(NamedTuple):
    """One conntrack timeout to renew (a named tuple: thousands are built a
    second at 100,000 flows, and a frozen dataclass costs a microsecond a field)."""

    raw_key: bytes
    reply: bool
    zone: int
    cls: RefreshClass


@dataclass
class SweepPlan:
    """What one sweep needs to know besides the map's bytes."""

    now_ns: int
    sweep_no: int  # the agent's count of sweeps (for logs; refreshes follow the clock)
    tcp_idle_ns: int
    udp_idle_ns: int
    timeouts: dict[RefreshClass, int]  # the timeout each class gets
    interval_s: float  # seconds since the entries read now were last read (at most)
    dead: set[bytes] = field(default_factory=set)  # wire ids conntrack destroyed or closed
    hybrid: frozenset[int] = frozenset()  # ingress devices with XDP and TC (hybrid hook)
    marks: dict[bytes, int] = field(default_factory=dict)  # wire id -> current conntrack mark
    held: set[bytes] = field(default_factory=set)  # wire ids of connections handed back (Handback)
    offload_timeout_s: int = OFFLOAD_TIMEOUT_S
    # How long until an entry read now is read again, at most; None: as
    # ``interval_s``. The first pass after a start counts every flow as due
    # (``interval_s`` an hour) but reads the next pass as soon as any.
    reread_s: float | None = None
    _due: dict[tuple[RefreshClass, bool] | None, bytes] | None = field(default=None, init=False,
                                                                       repr=False)
    _prefilters: dict[str, set[tuple[int, int, int]]] = field(default_factory=dict, init=False,
                                                              repr=False)
    _blocks: dict[bool, bytes] = field(default_factory=dict, init=False, repr=False)
    _longer: frozenset[RefreshClass] | None = field(default=None, init=False, repr=False)
    _cuts: tuple[int, int, int] | None = field(default=None, init=False, repr=False)
    _schedules: tuple[tuple[RefreshClass, bytes, int], ...] | None = field(
        default=None, init=False, repr=False)

    @classmethod
    def at(cls, now_ns: int, sweep_no: int, *, tcp_idle_s: float, udp_idle_s: float,
           timeouts: dict[RefreshClass, int], interval_s: float, dead: set[bytes],
           hybrid: frozenset[int] = frozenset(),
           marks: dict[bytes, int] | None = None) -> SweepPlan:
        return cls(now_ns, sweep_no, int(tcp_idle_s * NS), int(udp_idle_s * NS), timeouts,
                   interval_s, dead, hybrid, marks or {})

    def due_table(self, cls: RefreshClass | None = None, short: bool = False) -> bytes:
        """For each 16-bit port hash, whether a flow of ``cls`` (None: of
        any class, on the long periods) with that hash is due now.

        A hash h is due at the instants h / 65536 of the way through each
        of its class's periods (on the monotonic clock, so the refreshes of
        a class spread evenly over its period); a flow is due when such an
        instant fell since it was last read, within ``interval_s`` before
        now. Consecutive reads of an entry cover consecutive stretches of
        time, so it is renewed at least once a period, however late the
        ticks come.
        The due hashes are one range (modulo 65536) per class, set by slice
        assignment: testing an entry is one index. ``short``: the table of
        the class's own period (``period_s``), built when first asked."""
        if self._due is None:
            tables: dict[tuple[RefreshClass, bool] | None, bytes] = {}
            union = 0  # the tables as big integers, or'ed in C
            for c in RefreshClass:
                tables[(c, False)] = self._table(self.period_s(c))
                union |= int.from_bytes(tables[(c, False)], "little")
            tables[None] = union.to_bytes(1 << 16, "little")
            self._due = tables
        if cls is None:
            return self._due[None]
        got = self._due.get((cls, short))
        if got is None:
            got = self._due[(cls, short)] = self._table(self.period_s(cls, short))
        return got

    def due_blocks(self, short: bool = False) -> bytes:
        """For each high byte of a port hash, 1 when any hash with it is
        due now (``due_table()``, any class; ``short``: of the classes'
        own periods, any of those ``longer``): a ``translate`` table that
        picks the refresh (or young) candidates of a batch in C."""
        got = self._blocks.get(short)
        if got is None:
            union = 0
            for table in ([self.due_table(c, short=True) for c in self.longer()] if short
                          else [self.due_table()]):
                union |= int.from_bytes(table, "little")
            table = union.to_bytes(1 << 16, "little")
            got = self._blocks[short] = bytes(1 in table[b << 8 : (b + 1) << 8]
                                              for b in range(256))
        return got

    def longer(self) -> frozenset[RefreshClass]:
        """The classes an offloaded flow renews with a longer timeout than their own."""
        if self._longer is None:
            self._longer = frozenset(c for c in RefreshClass if self.keep_s(c) > self.timeouts[c])
        return self._longer

    def _table(self, period_s: float) -> bytes:
        one = 1 << 16
        period = int(period_s * NS)
        window = int(self.interval_s * NS)
        table = bytearray(one)
        if window >= period:
            table[:] = b"\x01" * one
        else:  # hashes in (lo, hi], wrapping round
            hi = self.now_ns % period * one // period
            lo = (self.now_ns - window) % period * one // period
            spans = [(lo + 1, hi + 1)] if lo <= hi else [(lo + 1, one), (0, hi + 1)]
            for start, end in spans:
                table[start:end] = b"\x01" * (end - start)
        return bytes(table)

    def prefilter(self, which: str) -> set[tuple[int, int, int]]:
        """(proto, ports) of the ``dead`` or ``marks`` ids, built once per
        pass, not once per batch (after a burst expires, ``dead`` holds
        thousands of ids and the map a hundred batches)."""
        got = self._prefilters.get(which)
        if got is None:
            ids = {"dead": self.dead, "marks": self.marks, "held": self.held}[which]
            got = self._prefilters[which] = _port_prefilter(ids)
        return got

    def schedule(self, cls: RefreshClass, short: bool = False) -> tuple[RefreshClass, bytes, int]:
        """(class, its due table, the last-seen time after which a flow
        counts as having carried traffic since its last refresh: a period
        and the time since the last read ago). ``short``: on the period of
        the class's own timeout, not the long one's."""
        since = self.now_ns - int((self.period_s(cls, short) + self.interval_s) * NS)
        return cls, self.due_table(cls, short), since

    def schedules(self) -> tuple[tuple[RefreshClass, bytes, int], ...]:
        """``schedule`` of TCP, UDP and UDP_NEW on their long periods,
        worked out once per plan, not once per batch."""
        if self._schedules is None:
            self._schedules = tuple(self.schedule(c) for c in
                                    (RefreshClass.TCP, RefreshClass.UDP, RefreshClass.UDP_NEW))
        return self._schedules

    def idle_cuts(self) -> tuple[int, int, int]:
        """The last-seen times before which a TCP, UDP or UDP_NEW flow is
        idle (``idle_ns`` ago), once per plan."""
        if self._cuts is None:
            tcp, udp, new = (self.now_ns - self.idle_ns(c) for c in
                             (RefreshClass.TCP, RefreshClass.UDP, RefreshClass.UDP_NEW))
            self._cuts = (tcp, udp, new)
        return self._cuts

    def keep_s(self, cls: RefreshClass) -> int:
        """The conntrack timeout an offloaded flow of ``cls`` is renewed
        with: ``offload_timeout_s``, never less than the class's own (TCP
        established's 5 days stay), as nf_flow_table pushes an offloaded
        connection's timeout out (nf_ct_offload_timeout). Handing the flow
        back puts the class's own back (Handback)."""
        return max(self.timeouts[cls], self.offload_timeout_s)

    def idle_ns(self, cls: RefreshClass) -> int:
        """How long a flow of ``cls`` may go without a packet before it is
        handed back: the configured idle timeout, never more than the
        class's conntrack timeout. The long timeout keeps the entry alive,
        so without this bound a flow the kernel would have forgotten (an
        unreplied UDP flow after 30 s) would still be forwarded."""
        idle = self.tcp_idle_ns if cls is RefreshClass.TCP else self.udp_idle_ns
        return min(idle, self.timeouts[cls] * NS)

    def period_s(self, cls: RefreshClass, short: bool = False) -> float:
        """Each class is renewed at half its long timeout (``keep_s``; with
        ``short``, its own timeout) when the other half leaves
        REFRESH_SPARE_S to spare (a pass spread over ticks, a loop running
        late), else at a third; within [1 s, MAX_PERIOD_S]."""
        timeout = self.timeouts[cls] if short else self.keep_s(cls)
        period = timeout / 2 if timeout / 2 >= REFRESH_SPARE_S else timeout / 3
        return max(1.0, min(MAX_PERIOD_S, period))


@dataclass
class SweepResult:
    remove: list[bytes] = field(default_factory=list)  # raw keys to delete
    reasons: Counter[Teardown] = field(default_factory=Counter)
    refresh: list[Refresh] = field(default_factory=list)
    pass_keys: list[bytes] = field(default_factory=list)  # room for offloadable flows
    to_tc: list[tuple[bytes, bytes]] = field(default_factory=list)  # hybrid: (key, new value)
    settled: list[bytes] = field(default_factory=list)  # renewed young flows' keys
    handed: list[tuple[bytes, bytes, RefreshClass]] = field(default_factory=list)  # to put back
    found: list[tuple[bytes, bool]] = field(default_factory=list)  # held wire, still offloaded
    entries: int = 0
    refreshes: int = 0  # totals of a whole pass (the lists above are per batch)
    handed_to_tc: int = 0


def classify(kb: bytes, vb: bytes, plan: SweepPlan, rec: Records,
             result: SweepResult | None = None) -> SweepResult:
    """Classify one batch of the flow map (``kb``: the keys, ``vb``: the
    values, back to back). The fields are read as columns (``Columns``),
    and each test first asks the whole batch at once, in C, whether any
    entry can need it at all (in a steady state none is closing, idle or
    passed, and a twentieth of the entries' refresh slices are due); only
    when one may, the test walks the column, and only the entries picked
    cost a Python step each."""
    out = result if result is not None else SweepResult()
    ks = rec.key_size
    cols = Columns(rec, kb, vb)
    protos = kb[rec.k_proto :: ks]
    sports, dports, states, seens = cols.sports, cols.dports, cols.states, cols.seens
    n = cols.n
    out.entries += n
    seen_any = not cols.all_equal(seens, 0)
    gone: dict[int, Teardown] = {}
    if seen_any:  # OFL_SEEN_KERNEL alone is no reason (see _refreshes)
        closing = map(rec.seen_closing.__and__, seens)
        gone = {i: Teardown.TCP_FLAGS for i in compress(range(n), closing)}
    flags_col = vb[rec.v_flags :: rec.flow_size]
    _idle(plan, rec, cols, protos, flags_col, gone)
    if plan.dead:
        _destroyed(kb, plan, rec, protos, sports, dports, gone)
    if plan.marks:
        _remarked(kb, vb, plan, rec, protos, sports, dports, gone)
    _young(kb, vb, plan, rec, cols, protos, flags_col, gone, out)
    fs = rec.flow_size
    if plan.held:
        _held(kb, vb, plan, rec, protos, sports, dports, states, gone, out)
    for i, reason in gone.items():
        out.remove.append(kb[i * ks : (i + 1) * ks])
        out.reasons[reason] += 1
        if reason in _PUT_BACK and states[i] == rec.state_offload:
            cls = class_of(protos[i], flags_col[i], rec)
            raw_flow = vb[i * fs : (i + 1) * fs]
            if cls in plan.longer() and not untouched(raw_flow, rec):
                out.handed.append((kb[i * ks : (i + 1) * ks], raw_flow, cls))
    offload = rec.state_offload
    if len(out.pass_keys) < PASS_KEYS_KEPT and not cols.all_equal(states, offload):
        room = PASS_KEYS_KEPT - len(out.pass_keys)
        out.pass_keys.extend(kb[i * ks : (i + 1) * ks] for i in
                             islice(compress(range(n), map(offload.__ne__, states)), room)
                             if i not in gone)
    _refreshes(kb, vb, plan, rec, cols, protos, seen_any, gone, out)
    if plan.hybrid:
        _bulk_to_tc(kb, vb, plan, rec, protos, states, gone, out)
    return out


def _idle(plan: SweepPlan, rec: Records, cols: Columns, protos: bytes, flags_col: bytes,
          gone: dict[int, Teardown]) -> None:
    """Entries older than their class's idle bound (the loosest bound
    filters first, and first over the whole batch at once)."""
    tcp, assured = socket.IPPROTO_TCP, rec.flag_assured
    cut_tcp, cut_udp, cut_new = plan.idle_cuts()
    loose = max(cut_tcp, cut_udp, cut_new)
    if cols.lasts_at_least(loose):
        return
    lasts = cols.lasts
    for i in compress(range(cols.n), map(loose.__gt__, lasts)):
        last = lasts[i]
        if last and i not in gone and last < (cut_tcp if protos[i] == tcp else cut_udp
                                              if flags_col[i] & assured else cut_new):
            gone[i] = Teardown.IDLE


# Hand-backs after which the conntrack entry's own timeout goes back: not a
# destroyed entry, nor FIN/RST/SYN (the datapath passes that packet, and the
# kernel sets the timeout of the state it moves to).
_PUT_BACK = frozenset({Teardown.IDLE, Teardown.CT_MARK})


YOUNG_SPARE_S = 1.0  # a young flow's renewal comes at least this long before its entry's end


def _young(kb: bytes, vb: bytes, plan: SweepPlan, rec: Records, cols: Columns, protos: bytes,
           flags_col: bytes, gone: dict[int, Teardown], out: SweepResult) -> None:
    """Young flows (OFL_V_YOUNG): offloaded while their conntrack entry has
    the kernel's own timeout T of their class, from the packet that let the
    agent offload them (their last-seen stamp while they carry nothing).
    At each due instant of T's own period P (``period_s(short=True)``):

      - a flow that carried a packet since it was offloaded is renewed with
        the long timeout, and the flag is cleared (``settled``);
      - one that carried nothing is handed back (removed; its entry keeps
        what the kernel left it) once the next instant, P and a read's
        lateness (``reread_s``: when it is read next) away, could come later
        than T allows; else it waits for that instant.

    A packet after the offload is therefore renewed within T, or meets the
    kernel's own path. The candidates (young, and a due hash in their
    high byte's block) are picked for the whole batch in C; ``_refreshes``
    leaves young flows alone."""
    young = rec.flag_young
    marks = flags_col.translate(_bit_table(young))
    if marks.find(1) < 0:
        return
    hashes, high = cols.port_hashes()
    due_blocks = high.translate(plan.due_blocks(short=True))
    both = int.from_bytes(marks, "little") & int.from_bytes(due_blocks, "little")
    if not both:
        return
    ks, fs = rec.key_size, rec.flow_size
    states, lasts = cols.states, cols.lasts
    offload, reply, longer = rec.state_offload, rec.flag_reply, plan.longer()
    reread = plan.interval_s if plan.reread_s is None else plan.reread_s
    for i in _positions(both.to_bytes(cols.n, "little")):
        if states[i] != offload or i in gone:
            continue
        cls = class_of(protos[i], flags_col[i], rec)
        if cls not in longer:
            continue  # it keeps its own timeout: renewed on the long schedule, as any flow
        _cls, due, _since = plan.schedule(cls, short=True)
        if not due[hashes[i]]:
            continue
        raw_key, raw_flow = kb[i * ks : (i + 1) * ks], vb[i * fs : (i + 1) * fs]
        if _packets(raw_flow, rec):
            out.refresh.append(tuple.__new__(Refresh, (raw_key, bool(flags_col[i] & reply),
                                                      rec.zone(raw_flow), cls)))
            out.settled.append(raw_key)
        elif ((plan.now_ns - lasts[i]) / NS + plan.period_s(cls, short=True) + reread
              >= plan.timeouts[cls] - YOUNG_SPARE_S):
            gone[i] = Teardown.IDLE


def _packets(raw_flow: bytes, rec: Records) -> int:
    return int.from_bytes(raw_flow[rec.f_packets : rec.f_packets + 8], "little")


def untouched(raw_flow: bytes, rec: Records) -> bool:
    """A young flow that carried nothing since its offload: its conntrack
    entry has exactly what the kernel left it, nothing to put back, and a
    connection held for a hand-back finds it kernel-side."""
    return bool(raw_flow[rec.v_flags] & rec.flag_young) and not _packets(raw_flow, rec)


@functools.lru_cache(maxsize=8)
def _bit_table(bit: int) -> bytes:
    """A ``translate`` table: 1 for the bytes with ``bit`` set, else 0."""
    return bytes(1 if b & bit else 0 for b in range(256))


def class_of(proto: int, flags: int, rec: Records) -> RefreshClass:
    """The timeout class of a flow from its protocol and verdict flags."""
    if proto == socket.IPPROTO_TCP:
        return RefreshClass.TCP
    return RefreshClass.UDP if flags & rec.flag_assured else RefreshClass.UDP_NEW


def _held(kb: bytes, vb: bytes, plan: SweepPlan, rec: Records, protos: bytes,
          sports: Sequence[int], dports: Sequence[int], states: Sequence[int],
          gone: dict[int, Teardown], out: SweepResult) -> None:
    """Directions of connections handed back (``plan.held``) still in the
    map: offloaded (the connection lives on) or passed (the kernel sees
    them; so does a young one that carried nothing since its offload, whose
    entry has the kernel's timeout from its last packet). Those going now
    are handed back themselves."""
    ks, fs, held = rec.key_size, rec.flow_size, plan.held
    prefilter = plan.prefilter("held")
    if prefilter.isdisjoint(zip(protos, sports, dports, strict=True)):
        return
    offload = rec.state_offload
    for i, t in enumerate(zip(protos, sports, dports, strict=True)):
        if t in prefilter and i not in gone:
            wire = rec.wire(kb[i * ks : (i + 1) * ks])
            if wire in held:
                out.found.append((wire, states[i] == offload
                                  and not untouched(vb[i * fs : (i + 1) * fs], rec)))


def _bulk_to_tc(kb: bytes, vb: bytes, plan: SweepPlan, rec: Records, protos: bytes,
                states: Sequence[int], gone: dict[int, Teardown], out: SweepResult) -> None:
    """Hybrid hook: a TCP flow that has carried BULK_BYTES in packets of at
    least BULK_PACKET bytes on average is a bulk transfer; from now on XDP
    passes it, GRO merges its segments and TC forwards the merged packet.
    Everything else stays in XDP. Decided from the flow's own counters."""
    ks, fs = rec.key_size, rec.flow_size
    nbytes = rec.flow_column(vb, rec.f_bytes, "Q")
    packets = rec.flow_column(vb, rec.f_packets, "Q")
    flags_col = vb[rec.v_flags :: fs]
    ifindexes = rec.key_column(kb, rec.k_ifindex, "I")
    tcp, offload, to_tc = socket.IPPROTO_TCP, rec.state_offload, rec.flag_tc
    for i in compress(range(len(nbytes)), map(BULK_BYTES.__le__, nbytes)):
        if (protos[i] != tcp or states[i] != offload or flags_col[i] & to_tc or i in gone
                or nbytes[i] < BULK_PACKET * packets[i] or ifindexes[i] not in plan.hybrid):
            continue
        raw_key, raw_flow = kb[i * ks : (i + 1) * ks], vb[i * fs : (i + 1) * fs]
        if rec.tc_can_forward(raw_key, raw_flow):
            out.to_tc.append((raw_key, rec.with_flags(raw_flow, to_tc)))


def _destroyed(kb: bytes, plan: SweepPlan, rec: Records, protos: bytes, sports: Sequence[int],
               dports: Sequence[int], gone: dict[int, Teardown]) -> None:
    """Entries of connections conntrack destroyed or closed: a cheap
    (proto, ports) prefilter, then the exact wire id."""
    ks, dead = rec.key_size, plan.dead
    dead_ports = plan.prefilter("dead")
    if dead_ports.isdisjoint(zip(protos, sports, dports, strict=True)):
        return
    for i, t in enumerate(zip(protos, sports, dports, strict=True)):
        if t in dead_ports and i not in gone and rec.wire(kb[i * ks : (i + 1) * ks]) in dead:
            gone[i] = Teardown.CT_DESTROYED


def _remarked(kb: bytes, vb: bytes, plan: SweepPlan, rec: Records, protos: bytes,
              sports: Sequence[int], dports: Sequence[int], gone: dict[int, Teardown]) -> None:
    """Flows looked up with another conntrack mark than their connection
    carries now (mwan3/pbr moved it to another uplink): policy routing may
    send it elsewhere, so it is decided again."""
    ks, marks = rec.key_size, plan.marks
    prefilter = plan.prefilter("marks")
    if prefilter.isdisjoint(zip(protos, sports, dports, strict=True)):
        return
    flow_marks = rec.flow_column(vb, rec.v_mark, "I")
    for i, t in enumerate(zip(protos, sports, dports, strict=True)):
        if t in prefilter and i not in gone:
            mark = marks.get(rec.wire(kb[i * ks : (i + 1) * ks]))
            if mark is not None and mark != flow_marks[i]:
                gone[i] = Teardown.CT_MARK


def _port_prefilter(ids: Iterable[bytes]) -> set[tuple[int, int, int]]:
    """(proto, sport, dport) of wire ids, ports as the key's bytes read in
    host order: a cheap test before the exact wire id is built."""
    return {(w[0], int.from_bytes(w[1:3], sys.byteorder), int.from_bytes(w[3:5], sys.byteorder))
            for w in ids}


def _refreshes(kb: bytes, vb: bytes, plan: SweepPlan, rec: Records, cols: Columns,
               protos: bytes, seen_any: bool, gone: dict[int, Teardown],
               out: SweepResult) -> None:
    """Offloaded flows that carried traffic since their last refresh and
    whose slice of the passes is due now (a hash of their ports): each is
    renewed once per period. A flow one of whose packets went to the kernel
    (OFL_SEEN_KERNEL: TTL, MTU, what TC cannot rewrite) had conntrack's
    own timeout put back by that packet, so it is renewed on its class's
    own period (``short``), as before the long timeout, still with it.

    The candidates are the entries whose hash's high byte has a due hash
    (``SweepPlan.due_blocks``: one ``translate`` of the high bytes) and, when
    any entry has a seen flag, those with OFL_SEEN_KERNEL; each candidate
    is then tested exactly. Young flows (``young``) have their own rule.
    """
    ks, fs = rec.key_size, rec.flow_size
    hashes, high = cols.port_hashes()
    picked = high.translate(plan.due_blocks())
    candidates: Iterable[int] = _positions(picked)
    seens, lasts, states = cols.seens, cols.lasts, cols.states
    kernel = rec.seen_kernel
    if seen_any and any(map(kernel.__and__, seens)):  # rare: their own schedule
        candidates = sorted({*candidates, *compress(range(cols.n), map(kernel.__and__, seens))})
    flags_col = vb[rec.v_flags :: fs]
    zones = rec.flow_column(vb, rec.v_zone, "H")
    offload, assured, reply = rec.state_offload, rec.flag_assured, rec.flag_reply
    young, longer = rec.flag_young, plan.longer()
    tcp = socket.IPPROTO_TCP
    # (class, due table, since when traffic counts), per class
    tcp_s, udp_s, new_s = plan.schedules()
    for i in candidates:
        last = lasts[i]
        if states[i] != offload or not last or i in gone:
            continue
        flags = flags_col[i]
        if flags & young and class_of(protos[i], flags, rec) in longer:
            continue  # _young's
        if seens[i] & kernel:
            cls, due, since = plan.schedule(RefreshClass.TCP if protos[i] == tcp else
                                            RefreshClass.UDP if flags & assured else
                                            RefreshClass.UDP_NEW, short=True)
        else:
            cls, due, since = tcp_s if protos[i] == tcp else udp_s if flags & assured else new_s
        if due[hashes[i]] and last > since:
            # tuple.__new__: a named tuple's own constructor is Python code
            out.refresh.append(tuple.__new__(Refresh, (kb[i * ks : (i + 1) * ks],
                                                      bool(flags & reply), zones[i], cls)))


def _positions(marks: bytes) -> Iterator[int]:
    """The indexes of the nonzero bytes of ``marks`` (0 or 1 each), found
    with ``bytes.find``: a step per mark, not per byte."""
    i = marks.find(1)
    while i >= 0:
        yield i
        i = marks.find(1, i + 1)


class FlowMap(Protocol):
    def batches(self) -> Iterator[tuple[bytes, bytes, int]]: ...
    def delete_batch(self, keys: list[bytes]) -> int: ...
    def update(self, key: bytes, value: bytes, flags: int = ...) -> None: ...
    def lookup(self, key: bytes) -> bytes | None: ...


class Keepalive(Protocol):
    """Conntrack's side: renew timeouts, and say which entries were gone."""

    def refresh_keys(self, items: Sequence[tuple[bytes, bytes, bytes, bytes, int, bool, int, int]],
                     tags: Sequence[bytes]) -> int: ...
    def take_gone(self) -> list[bytes]: ...
    def put_back(self, items: Sequence[tuple[bytes, bytes, bytes, bytes, int, bool, int, int]]
                 ) -> int: ...
    def take_offloaded(self) -> list[tuple[bytes, bool, int, bool]]: ...


class Sweeper:
    """Handed the flow map and conntrack's keep-alive; walks the map a share
    of it a tick.

    A pass (a walk of the whole map) is spread over as many ticks as it
    takes to read at most ``per_tick`` entries a tick, and never over more
    than ``max_ticks``: the last tick of a pass reads whatever is left. An
    entry that stays in the map is therefore visited once in every pass,
    and two visits are less than two passes (``2 * max_ticks`` ticks)
    apart. A small map is walked whole every tick, as before.

    Refreshes follow the clock, not the ticks (``SweepPlan.due_table``):
    each read of an entry covers the time since the previous pass began
    (when it was last read, at the earliest), so an active flow is renewed
    once a period, at most a period plus two passes apart even when ticks
    come late (more often when an entry is read late in one pass and early
    in the next: the stretches overlap). Destroyed and re-marked
    connections a tick brings are checked against the rest of this pass and
    all of the next one, which covers every entry once.

    Renewals set the long timeout (``SweepPlan.keep_s``); a flow offloaded
    since the last tick gets it at the next tick (``take_offloaded``), since
    its first due instant may be a long period away. Connections handed back
    are ``Handback``'s until their own timeout is put back.
    """

    def __init__(self, flows: FlowMap, ct: Keepalive, rec: Records, *,
                 on_remove: Callable[[list[bytes]], None] | None = None,
                 per_tick: int = ENTRIES_PER_TICK, max_ticks: int = MAX_PASS_TICKS) -> None:
        """``on_remove`` is told the raw keys of each batch of entries the
        sweep removed (what the agent keeps about them goes too)."""
        self.flows = flows
        self.ct = ct
        self.rec = rec
        self.on_remove = on_remove or (lambda _keys: None)
        self.per_tick = per_tick
        self.max_ticks = max_ticks
        self.passes = 0  # ticks run
        self.walks = 0  # passes completed
        self.failures = 0
        self.refreshed = 0
        self.to_tc = 0  # flows handed to TC (hybrid)
        self.settled = 0  # young flows renewed, their flag cleared
        self._walk: Iterator[tuple[bytes, bytes, int]] | None = None
        self._ticks = 1  # ticks the current pass is spread over
        self._tick = 0  # ticks of it run
        self._read = 0  # entries it has read
        self._expected = 0  # entries the last pass read
        self._pass_started = 0  # monotonic ns of the current pass's first tick
        self._previous_started: int | None = None  # of the last pass that completed
        self._dead: tuple[set[bytes], set[bytes]] = (set(), set())  # (this pass, the previous)
        self._marks: tuple[dict[bytes, int], dict[bytes, int]] = ({}, {})
        self.handback = Handback(ct, rec)
        self.between: Callable[[], None] = lambda: None  # serves the loop (serve_with)
        self._timeouts: dict[RefreshClass, int] = {}  # the last plan's
        self._queued: list[Refresh] = []  # the walk's refreshes, sent REFRESH_SEND at a time
        self._settling: list[bytes] = []  # young among them: keys whose flag is cleared after

    def run(self, plan: SweepPlan) -> SweepResult:
        """One tick: the next share of the current pass. Each batch's actions
        are applied before the next batch is read, so what a tick holds at
        once is one batch's worth (the flows visited are in buckets the walk
        has left behind)."""
        self.passes += 1
        self._timeouts = plan.timeouts
        fresh_gone = self._keep_offloaded(plan)
        if self._walk is None:
            self._walk = iter(self.flows.batches())
            self._ticks = max(1, min(self.max_ticks, math.ceil(self._expected / self.per_tick)))
            self._tick = self._read = 0
        self._tick += 1
        if self._tick == 1:
            self._pass_started = plan.now_ns
        self._dead[0].update(plan.dead)
        self._marks[0].update(plan.marks)
        pending = len(self._dead[0]) + len(self._dead[1]) + len(self._marks[0]) + len(self._marks[1])
        last_tick = (self._tick >= self._ticks or pending > IDS_KEPT  # bounded memory: finish now
                     or self.handback.overflowing())
        quota = math.ceil((self._expected - self._read) / (self._ticks - self._tick + 1))
        # What this tick reads was last read in the previous pass, after it began.
        since_read = (FIRST_WINDOW_S if self._previous_started is None
                      else (plan.now_ns - self._previous_started) / NS)
        reread = (since_read if self._previous_started is not None
                  else plan.interval_s * self.max_ticks)  # the sweep's interval, a whole spread pass
        tick_plan = replace(plan, interval_s=since_read, reread_s=reread, dead=self._dead[0] | self._dead[1],
                            marks={**self._marks[1], **self._marks[0]},
                            held=self.handback.wires() if len(self.handback) else set())
        total = SweepResult()
        total.reasons.update(fresh_gone)
        done = failed = False
        try:
            read = 0
            while last_tick or read < quota:
                batch = next(self._walk, None)
                if batch is None:
                    done = True
                    break
                kb, vb, n = batch
                read += n
                part = classify(kb, vb, tick_plan, self.rec)
                self._apply(part, tick_plan, queue=True)
                total.entries += part.entries
                if part.reasons:
                    total.reasons.update(part.reasons)
                if part.pass_keys:
                    total.pass_keys.extend(part.pass_keys[: PASS_KEYS_KEPT - len(total.pass_keys)])
                total.refreshes += len(part.refresh)
                total.handed_to_tc += len(part.to_tc)
            self._read += read
            if self._queued:
                self._send_queued(tick_plan)
                self._take_gone(total.reasons)
        except (OffloadError, OSError) as exc:
            self.failures += 1
            self._queued = []  # their due instants come again: the failed pass keeps its start
            self._settling = []
            log.warning("sweep failed (will retry): %s", exc)
            done = failed = True
        if done:
            self._end_pass(failed)
            if not failed:  # else what it held was not checked against every entry
                with contextlib.suppress(OffloadError, OSError):
                    self.handback.end_pass(plan.timeouts, plan.now_ns)
        return total

    def _keep_offloaded(self, plan: SweepPlan) -> Counter[Teardown]:
        """Flows offloaded since the last tick: their conntrack entry still
        has the timeout the kernel set (30 s for unreplied UDP), and their
        first due instant may be a long period away: renew it now. Returns
        the flows torn down because their entry was gone meanwhile."""
        gone: Counter[Teardown] = Counter()
        fresh = self.ct.take_offloaded()
        if not fresh:
            return gone
        rec = self.rec
        if len(self.handback):
            self.handback.offloaded_again(rec.wire(k) for k, _reply, _zone, _assured in fresh)
        longer = plan.longer()
        assured_flag = rec.flag_assured
        # FRESH_CHUNK at a time, the loop's other sources served in between:
        # at 1,000 new flows a second, a tick's renewals held the loop 23 ms
        # at once, and the new flows arriving meanwhile waited behind them.
        for start in range(0, len(fresh), FRESH_CHUNK):
            if start:
                self.between()
            refresh = []
            for raw_key, reply, zone, assured in fresh[start : start + FRESH_CHUNK]:
                cls = class_of(raw_key[rec.k_proto], assured_flag if assured else 0, rec)
                if cls in longer:
                    refresh.append(tuple.__new__(Refresh, (raw_key, reply, zone, cls)))
            if refresh:
                part = SweepResult(refresh=refresh)
                try:
                    self._apply(part, plan)
                except (OffloadError, OSError) as exc:
                    log.warning("renewing new flows' conntrack timeout failed: %s", exc)
                    break
                gone.update(part.reasons)
        return gone

    def serve_with(self, serve: Callable[[], None]) -> None:
        """``serve`` (the event loop's ``serve_ready``) runs between the
        map's batches and between chunks of new flows' renewals, so that a
        tick never holds new flows back for long."""
        self.flows = ServedBetween(self.flows, serve, SERVED_BATCH)
        self.between = serve

    def hand_back(self, entries: Iterable[tuple[bytes, bytes]]) -> None:
        """Flows the agent removed from the map or passed (a MAC or route
        change, a ruleset change): their connections are held until the next
        pass has shown whether another direction lives on, then their
        conntrack timeout is put back."""
        timeouts = self._timeouts
        if not timeouts:
            return  # no sweep ran yet: nothing was renewed
        plan = SweepPlan(0, 0, 0, 0, timeouts, 0.0)
        self.handback.hold(self._extended(entries, plan))

    def hand_back_all(self, timeouts: dict[RefreshClass, int], *, delete: bool = True,
                      now_ns: int | None = None) -> int:
        """Every offloaded flow goes back to the kernel at once (a flush,
        shutdown): put back the conntrack timeout of their connections now,
        and delete every entry (``delete``). Returns how many were deleted.

        Two walks, memory bounded by what is held: the first holds the
        directions that would expire (idle for their class's timeout: few,
        the sweep hands those back within a pass); the second puts every
        other direction's timeout back at once, from its own last packet
        (each direction of a connection sends its own, the last one sent
        wins: short by at most the gap between the two directions' last
        packets, while the kernel sees their packets from now on), and a
        held direction whose partner
        it meets goes with the partner (not deleted), a partner the kernel
        forwards gives it the whole class timeout; what is still held at
        the end has no live direction left and is deleted."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        plan = SweepPlan(now, 0, 0, 0, timeouts, 0.0)
        for batch in self._pairs():
            self.handback.hold(e for e in self._extended(batch, plan) if self._expired(e, plan))
        removed = 0
        for batch in self._pairs():
            if delete:
                removed += self.flows.delete_batch([k for k, _ in batch])
            self._put_back_live(batch, plan)
        self._walk = None  # a walk in progress has lost its place
        self.handback.send_all(timeouts, now)
        return removed

    def _pairs(self) -> Iterator[list[tuple[bytes, bytes]]]:
        ks, fs = self.rec.key_size, self.rec.flow_size
        for kb, vb, n in self.flows.batches():
            yield [(kb[i * ks : (i + 1) * ks], vb[i * fs : (i + 1) * fs]) for i in range(n)]

    def _expired(self, entry: tuple[bytes, bytes, RefreshClass], plan: SweepPlan) -> bool:
        """Whether this direction went its class's whole timeout without a packet."""
        rec, raw_flow = self.rec, entry[1]
        last = int.from_bytes(raw_flow[rec.f_last : rec.f_last + 8], "little")
        return bool(last) and plan.now_ns - last >= plan.timeouts[entry[2]] * NS

    def _put_back_live(self, batch: list[tuple[bytes, bytes]], plan: SweepPlan) -> None:
        """hand_back_all's second walk, one batch: the timeout of each live
        direction put back now; held connections it belongs to go with it."""
        rec, hb = self.rec, self.handback
        items = []
        for entry in self._extended(batch, plan):
            if self._expired(entry, plan):
                continue  # held
            raw_key, raw_flow, cls = entry
            if len(hb):
                hb.found(rec.wire(raw_key), True)
                hb.found(hb.partner_wire(raw_key, raw_flow), True)
            items.append(hb.item(self._held(raw_key, raw_flow, cls), plan.timeouts, plan.now_ns))
        if len(hb):  # passed directions of held connections: the kernel sees them
            for raw_key, raw_flow in batch:
                if raw_flow[rec.f_state] != rec.state_offload:
                    hb.found(rec.wire(raw_key), False)
        if items:
            self.ct.put_back(items)

    def _held(self, raw_key: bytes, raw_flow: bytes, cls: RefreshClass) -> Held:
        rec = self.rec
        return Held(raw_key, (b"", b""), bool(raw_flow[rec.v_flags] & rec.flag_reply),
                    rec.zone(raw_flow), cls,
                    int.from_bytes(raw_flow[rec.f_last : rec.f_last + 8], "little"))

    def _extended(self, entries: Iterable[tuple[bytes, bytes]], plan: SweepPlan
                  ) -> Iterator[tuple[bytes, bytes, RefreshClass]]:
        """The offloaded ones among ``entries`` whose class gets a longer
        timeout while offloaded, with their class; not the young ones that
        carried nothing since their offload, whose entry has what the kernel
        left it."""
        rec = self.rec
        for raw_key, raw_flow in entries:
            if not rec.offloaded(raw_flow):
                continue
            if untouched(raw_flow, rec):
                continue
            cls = class_of(raw_key[rec.k_proto], raw_flow[rec.v_flags], rec)
            if cls in plan.longer():
                yield raw_key, raw_flow, cls

    def _end_pass(self, failed: bool) -> None:
        self._walk = None
        self.walks += 1
        if not failed:  # else what it did not read was last read before it: keep the older start
            self._previous_started = self._pass_started
        self._expected = self._read
        self._dead = (set(), self._dead[0])
        self._marks = ({}, self._marks[0])

    def _apply(self, part: SweepResult, plan: SweepPlan, *, queue: bool = False) -> None:
        """Carry out one batch's actions. ``queue``: its refreshes wait in
        ``_queued`` until REFRESH_SEND have gathered (``_send_queued``)."""
        for wire, offloaded in part.found:
            self.handback.found(wire, offloaded)
        if part.remove:
            self.flows.delete_batch(part.remove)
            self.on_remove(part.remove)
            self.handback.hold(part.handed)
        self._queued.extend(part.refresh)
        self._settling.extend(part.settled)
        if self._queued and (not queue or len(self._queued) >= REFRESH_SEND):
            self._send_queued(plan)
        for raw_key, raw_flow in part.to_tc:
            # Rewritten whole: the packets counted since the batch was read
            # are lost from the counters (a few, once per flow).
            with contextlib.suppress(MapError):  # gone meanwhile
                self.flows.update(raw_key, raw_flow, BPF_EXIST)
                self.to_tc += 1
        # A refresh that found no entry: conntrack forgot the connection (its
        # DESTROY event was lost): the flow must not bypass the firewall.
        self._take_gone(part.reasons)

    def _send_queued(self, plan: SweepPlan) -> None:
        refresh, self._queued = self._queued, []
        keep = {c: plan.keep_s(c) for c in RefreshClass}
        item = self.rec.ct_item
        items = [item(k, reply, zone, keep[cls]) for k, reply, zone, cls in refresh]
        self.refreshed += self.ct.refresh_keys(items, [r.raw_key for r in refresh])
        # Young flows renewed by this send lose their flag only now: had the
        # send failed, they would still be young, and due again in time. The
        # entry is read again just before it is written: the batch it was
        # found in is older by the whole gathering of REFRESH_SEND renewals
        # and the loop's work in between, and written back it would set the
        # flow's counters and seen flags back to that read (a lane test lost
        # 55 packets of a 250-a-second flow's count that way).
        settled, self._settling = self._settling, []
        rec, young = self.rec, self.rec.flag_young
        for raw_key in settled:
            fresh = self.flows.lookup(raw_key)
            if fresh is None or not fresh[rec.v_flags] & young or not rec.offloaded(fresh):
                continue  # gone, settled or handed back meanwhile
            with contextlib.suppress(MapError):  # gone meanwhile
                self.flows.update(raw_key, rec.with_flags(fresh, 0, young), BPF_EXIST)
                self.settled += 1

    def _take_gone(self, reasons: Counter[Teardown]) -> None:
        gone = self.ct.take_gone()
        if gone:
            n = self.flows.delete_batch(gone)
            if n:  # none: those flows had left the map already
                reasons[Teardown.CT_GONE] += n
            self.on_remove(gone)
