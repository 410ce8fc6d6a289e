"""The sweep: the flow map's garbage collector and conntrack's keep-alive.

Once a tick the sweep reads the flow map in batches and classifies every
entry from its bytes alone:

  - hand back (``Teardown``): the datapath saw FIN/RST/SYN, the flow idled
    past its protocol's timeout, or conntrack destroyed or closed it;
  - refresh: an offloaded flow that carried traffic and whose slice of the
    refresh period is due gets its conntrack timeout renewed, with the
    timeout the kernel itself would set for its class (``RefreshClass``).

``classify`` is pure (bytes, a clock and a plan in, actions out), so it is
tested without BPF or root. ``Sweeper`` is handed the map and the refresh
call, applies the actions, and never raises: a failed pass is logged and
the next tick tries again.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import operator
import socket
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from . import ctnetlink
from .bpfobj import BPF_EXIST
from .decision import Teardown
from .errors import MapError, OffloadError
from .records import Records

log = logging.getLogger(__name__)

NS = 1_000_000_000
PASS_KEYS_KEPT = 4096  # pass entries remembered as room for offloadable flows
BULK_BYTES = 1 << 20  # hybrid: a TCP flow that carried this much ...
BULK_PACKET = 1000  # ... in packets this large on average is bulk: TC forwards it


class RefreshClass(enum.Enum):
    """Conntrack timeout classes: which of the namespace's timeouts applies."""

    TCP = "tcp"  # nf_conntrack_tcp_timeout_established
    UDP = "udp"  # nf_conntrack_udp_timeout_stream (assured)
    UDP_NEW = "udp-new"  # nf_conntrack_udp_timeout (not assured)


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


@dataclass(frozen=True)
class Refresh:
    """One conntrack timeout to renew."""

    raw_key: bytes
    reply: bool
    zone: int
    cls: RefreshClass


@dataclass
class SweepPlan:
    """What one sweep needs to know besides the map's bytes."""

    now_ns: int
    sweep_no: int  # spreads refreshes over the sweeps of a period
    tcp_idle_ns: int
    udp_idle_ns: int
    timeouts: dict[RefreshClass, int]  # the timeout each class gets
    interval_s: float  # seconds between sweeps
    dead: set[bytes] = field(default_factory=set)  # wire ids conntrack destroyed or closed
    hybrid: frozenset[int] = frozenset()  # ingress devices with XDP and TC (hybrid hook)
    marks: dict[bytes, int] = field(default_factory=dict)  # wire id -> current conntrack mark
    _due: bytes | None = field(default=None, init=False, repr=False)
    _prefilters: dict[str, set[tuple[int, int, int]]] = field(default_factory=dict, init=False,
                                                              repr=False)

    @classmethod
    def at(cls, now_ns: int, sweep_no: int, *, tcp_idle_s: float, udp_idle_s: float,
           timeouts: dict[RefreshClass, int], interval_s: float, dead: set[bytes],
           hybrid: frozenset[int] = frozenset(),
           marks: dict[bytes, int] | None = None) -> SweepPlan:
        return cls(now_ns, sweep_no, int(tcp_idle_s * NS), int(udp_idle_s * NS), timeouts,
                   interval_s, dead, hybrid, marks or {})

    def due_table(self) -> bytes:
        """For each 16-bit port hash, whether any class's slice is due now:
        built by slice assignment, so testing an entry is one index."""
        if self._due is None:
            table = bytearray(1 << 16)
            for cls in RefreshClass:
                n = self.slices(cls)
                start = self.sweep_no % n
                table[start::n] = b"\x01" * len(range(start, 1 << 16, n))
            self._due = bytes(table)
        return self._due

    def prefilter(self, which: str) -> set[tuple[int, int, int]]:
        """(proto, ports) of the ``dead`` or ``marks`` ids, built once per
        pass, not once per batch (after a burst expires, ``dead`` holds
        thousands of ids and the map a hundred batches)."""
        got = self._prefilters.get(which)
        if got is None:
            got = self._prefilters[which] = _port_prefilter(
                self.dead if which == "dead" else self.marks)
        return got

    def period_s(self, cls: RefreshClass) -> float:
        """Each class is renewed at a third of its timeout, within [1 s, 60 s]."""
        return max(1.0, min(60.0, self.timeouts[cls] / 3))

    def slices(self, cls: RefreshClass) -> int:
        return max(1, int(self.period_s(cls) / self.interval_s))


@dataclass
class SweepResult:
    remove: list[bytes] = field(default_factory=list)  # raw keys to delete
    reasons: Counter[Teardown] = field(default_factory=Counter)
    refresh: list[Refresh] = field(default_factory=list)
    pass_keys: list[bytes] = field(default_factory=list)  # room for offloadable flows
    to_tc: list[tuple[bytes, bytes]] = field(default_factory=list)  # hybrid: (key, new value)
    entries: int = 0
    refreshes: int = 0  # totals of a whole pass (the lists above are per batch)
    handed_to_tc: int = 0


def classify(kb: bytes, vb: bytes, plan: SweepPlan, rec: Records,
             result: SweepResult | None = None) -> SweepResult:
    """Classify one batch of the flow map (``kb``: the keys, ``vb``: the
    values, back to back). The fields are read as columns (strided views of
    the batch), and each test is a comprehension over a column, so the
    Python work per entry is a few bytecodes; entries that need something
    are then looked at one by one."""
    out = result if result is not None else SweepResult()
    ks = rec.key_size
    protos = kb[rec.k_proto :: ks]
    # Ports as the key's bytes read in host order: only compared and hashed.
    sports = rec.key_column(kb, rec.k_sport, "H")
    dports = rec.key_column(kb, rec.k_sport + 2, "H")
    lasts = rec.flow_column(vb, rec.f_last, "Q")
    seens = rec.flow_column(vb, rec.f_seen, "I")
    states = rec.flow_column(vb, rec.f_state, "I")
    n = len(lasts)
    out.entries += n
    gone: dict[int, Teardown] = {i: Teardown.TCP_FLAGS for i, s in enumerate(seens) if s}
    # Idle: older than its protocol's timeout (the looser bound filters first).
    tcp = socket.IPPROTO_TCP
    cut_tcp, cut_udp = plan.now_ns - plan.tcp_idle_ns, plan.now_ns - plan.udp_idle_ns
    loose = max(cut_tcp, cut_udp)
    for i in [i for i, last in enumerate(lasts) if 0 < last < loose]:
        if i not in gone and lasts[i] < (cut_tcp if protos[i] == tcp else cut_udp):
            gone[i] = Teardown.IDLE
    if plan.dead:
        _destroyed(kb, plan, rec, protos, sports, dports, gone)
    if plan.marks:
        _remarked(kb, vb, plan, rec, protos, sports, dports, gone)
    for i, reason in gone.items():
        out.remove.append(kb[i * ks : (i + 1) * ks])
        out.reasons[reason] += 1
    offload = rec.state_offload
    if len(out.pass_keys) < PASS_KEYS_KEPT:
        room = PASS_KEYS_KEPT - len(out.pass_keys)
        out.pass_keys.extend(kb[i * ks : (i + 1) * ks] for i in
                             [i for i, st in enumerate(states) if st != offload][:room]
                             if i not in gone)
    _refreshes(kb, vb, plan, rec, protos, sports, dports, lasts, states, gone, out)
    if plan.hybrid:
        _bulk_to_tc(kb, vb, plan, rec, protos, states, gone, out)
    return out


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
    for i in [i for i, b in enumerate(nbytes) if b >= BULK_BYTES]:
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


def _refreshes(kb: bytes, vb: bytes, plan: SweepPlan, rec: Records, protos: bytes,
               sports: Sequence[int], dports: Sequence[int], lasts: Sequence[int],
               states: Sequence[int], gone: dict[int, Teardown], out: SweepResult) -> None:
    """Offloaded flows that carried traffic within their class's period and
    whose slice of the sweeps is due now (a hash of their ports): each is
    renewed once per period."""
    ks, fs = rec.key_size, rec.flow_size
    slices = {cls: plan.slices(cls) for cls in RefreshClass}
    due = {cls: plan.sweep_no % n for cls, n in slices.items()}
    table = plan.due_table()
    candidates = [i for i, h in enumerate(map(operator.xor, sports, dports)) if table[h]]
    flags_col = vb[rec.v_flags :: fs]
    zones = rec.flow_column(vb, rec.v_zone, "H")
    offload, assured, reply = rec.state_offload, rec.flag_assured, rec.flag_reply
    tcp = socket.IPPROTO_TCP
    for i in candidates:
        last = lasts[i]
        if states[i] != offload or not last or i in gone:
            continue
        flags = flags_col[i]
        if protos[i] == tcp:
            cls = RefreshClass.TCP
        else:
            cls = RefreshClass.UDP if flags & assured else RefreshClass.UDP_NEW
        if ((sports[i] ^ dports[i]) % slices[cls] == due[cls]
                and plan.now_ns - last < plan.period_s(cls) * NS):
            out.refresh.append(Refresh(kb[i * ks : (i + 1) * ks], bool(flags & reply), zones[i],
                                       cls))


class FlowMap(Protocol):
    def batches(self) -> Iterator[tuple[bytes, bytes, int]]: ...
    def delete_batch(self, keys: list[bytes]) -> int: ...
    def update(self, key: bytes, value: bytes, flags: int = ...) -> None: ...


class Keepalive(Protocol):
    """Conntrack's side: renew timeouts, and say which entries were gone."""

    def refresh_many(self, items: Sequence[tuple[ctnetlink.Raw5, bool, int, int]],
                     tags: Sequence[bytes] | None = None) -> int: ...
    def take_gone(self) -> list[bytes]: ...


class Sweeper:
    """Handed the flow map and conntrack's keep-alive; runs one pass a tick."""

    def __init__(self, flows: FlowMap, ct: Keepalive, rec: Records, *,
                 on_remove: Callable[[list[bytes]], None] | None = None) -> None:
        """``on_remove`` is told the raw keys of each batch of entries the
        sweep removed (what the agent keeps about them goes too)."""
        self.flows = flows
        self.ct = ct
        self.rec = rec
        self.on_remove = on_remove or (lambda _keys: None)
        self.passes = 0
        self.failures = 0
        self.refreshed = 0
        self.to_tc = 0  # flows handed to TC (hybrid)

    def run(self, plan: SweepPlan) -> SweepResult:
        """One pass. Each batch's actions are applied before the next batch
        is read, so what the pass holds at once is one batch's worth (the
        flows visited are in buckets the walk has left behind)."""
        self.passes += 1
        total = SweepResult()
        try:
            for kb, vb, _n in self.flows.batches():
                part = classify(kb, vb, plan, self.rec)
                self._apply(part, plan)
                total.entries += part.entries
                total.reasons.update(part.reasons)
                total.pass_keys.extend(part.pass_keys[: PASS_KEYS_KEPT - len(total.pass_keys)])
                total.refreshes += len(part.refresh)
                total.handed_to_tc += len(part.to_tc)
        except (OffloadError, OSError) as exc:
            self.failures += 1
            log.warning("sweep failed (will retry): %s", exc)
        return total

    def _apply(self, part: SweepResult, plan: SweepPlan) -> None:
        if part.remove:
            self.flows.delete_batch(part.remove)
            self.on_remove(part.remove)
        if part.refresh:
            items = [(self.rec.raw5(r.raw_key), r.reply, r.zone, plan.timeouts[r.cls])
                     for r in part.refresh]
            self.refreshed += self.ct.refresh_many(items, [r.raw_key for r in part.refresh])
        for raw_key, raw_flow in part.to_tc:
            # Rewritten whole: the packets counted since the batch was read
            # are lost from the counters (a few, once per flow).
            with contextlib.suppress(MapError):  # gone meanwhile
                self.flows.update(raw_key, raw_flow, BPF_EXIST)
                self.to_tc += 1
        # A refresh that found no entry: conntrack forgot the connection (its
        # DESTROY event was lost): the flow must not bypass the firewall.
        gone = self.ct.take_gone()
        if gone:
            part.reasons[Teardown.CT_GONE] += self.flows.delete_batch(gone)
            self.on_remove(gone)
