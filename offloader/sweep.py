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

import enum
import logging
import socket
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from . import ctnetlink
from .decision import Teardown
from .errors import OffloadError
from .records import Records

log = logging.getLogger(__name__)

NS = 1_000_000_000
PASS_KEYS_KEPT = 4096  # pass entries remembered as room for offloadable flows


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

    @classmethod
    def at(cls, now_ns: int, sweep_no: int, *, tcp_idle_s: float, udp_idle_s: float,
           timeouts: dict[RefreshClass, int], interval_s: float, dead: set[bytes]) -> SweepPlan:
        return cls(now_ns, sweep_no, int(tcp_idle_s * NS), int(udp_idle_s * NS), timeouts,
                   interval_s, dead)

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
    entries: int = 0


def classify(kb: bytes, vb: bytes, plan: SweepPlan, rec: Records,
             result: SweepResult | None = None) -> SweepResult:
    """Classify one batch of the flow map (``kb``: the keys, ``vb``: the
    values, back to back). Per entry the work is a handful of comparisons:
    fields come from struct.iter_unpack over the whole batch."""
    out = result if result is not None else SweepResult()
    ks = rec.key_size
    tcp = socket.IPPROTO_TCP
    dead = plan.dead
    # Ports as the key struct reads them (host order of network bytes):
    # a cheap prefilter before the exact wire id is built.
    dead_ports = {(w[0], int.from_bytes(w[1:3], sys.byteorder),
                   int.from_bytes(w[3:5], sys.byteorder)) for w in dead}
    due = {cls: plan.sweep_no % plan.slices(cls) for cls in RefreshClass}
    for i, ((proto, sport, dport), (flags, zone, last, state, seen)) in enumerate(
            zip(rec.key_fields.iter_unpack(kb), rec.flow_fields.iter_unpack(vb), strict=True)):
        out.entries += 1
        raw_key = kb[i * ks : (i + 1) * ks]
        reason = None
        if seen:
            reason = Teardown.TCP_FLAGS
        elif last and plan.now_ns - last > (plan.tcp_idle_ns if proto == tcp else plan.udp_idle_ns):
            reason = Teardown.IDLE
        elif dead_ports and (proto, sport, dport) in dead_ports and rec.wire(raw_key) in dead:
            reason = Teardown.CT_DESTROYED
        if reason is not None:
            out.remove.append(raw_key)
            out.reasons[reason] += 1
            continue
        if state != rec.state_offload:
            if len(out.pass_keys) < PASS_KEYS_KEPT:
                out.pass_keys.append(raw_key)
            continue
        if not last:
            continue
        if proto == tcp:
            cls = RefreshClass.TCP
        else:
            cls = RefreshClass.UDP if flags & rec.flag_assured else RefreshClass.UDP_NEW
        # Renew flows that carried traffic within the period, each in its
        # own slice of the sweeps (a hash of its ports).
        if (plan.now_ns - last < plan.period_s(cls) * NS
                and (sport ^ dport) % plan.slices(cls) == due[cls]):
            out.refresh.append(Refresh(raw_key, bool(flags & rec.flag_reply), zone, cls))
    return out


class FlowMap(Protocol):
    def batches(self) -> Iterator[tuple[bytes, bytes, int]]: ...
    def delete_batch(self, keys: list[bytes]) -> int: ...


class Keepalive(Protocol):
    """Conntrack's side: renew timeouts, and say which entries were gone."""

    def refresh_many(self, items: Sequence[tuple[ctnetlink.Raw5, bool, int, int]],
                     tags: Sequence[bytes] | None = None) -> int: ...
    def take_gone(self) -> list[bytes]: ...


class Sweeper:
    """Handed the flow map and conntrack's keep-alive; runs one pass a tick."""

    def __init__(self, flows: FlowMap, ct: Keepalive, rec: Records) -> None:
        self.flows = flows
        self.ct = ct
        self.rec = rec
        self.passes = 0
        self.failures = 0
        self.refreshed = 0

    def run(self, plan: SweepPlan) -> SweepResult:
        self.passes += 1
        result = SweepResult()
        try:
            for kb, vb, _n in self.flows.batches():
                classify(kb, vb, plan, self.rec, result)
            if result.remove:
                self.flows.delete_batch(result.remove)
            items = [(self.rec.raw5(r.raw_key), r.reply, r.zone, plan.timeouts[r.cls])
                     for r in result.refresh]
            if items:
                self.refreshed += self.ct.refresh_many(items, [r.raw_key for r in result.refresh])
            # A refresh that found no entry: conntrack forgot the connection
            # (its DESTROY event was lost): the flow must not bypass the
            # firewall any longer.
            gone = self.ct.take_gone()
            if gone:
                result.reasons[Teardown.CT_GONE] += self.flows.delete_batch(gone)
        except (OffloadError, OSError) as exc:
            self.failures += 1
            log.warning("sweep failed (will retry): %s", exc)
        return result
