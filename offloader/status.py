"""What the agent counts, and the report ``ebpf-offloader status`` prints.

The report is built by a forked child of the agent (see control.py), from
the maps and from what the agent already knows: it sends nothing on the
agent's netlink sockets.
"""

from __future__ import annotations

import heapq
import ipaddress
import socket
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .datapath import Datapath, FlowEntry, FlowKey, flow_entry
from .decision import DropReason, PassReason, Teardown
from .drops import busiest_sources
from .layout import layout
from .records import column

LATENCY_SAMPLES = 20_000  # setup latencies kept for status


@dataclass
class Counters:
    offloaded: int = 0
    passed: Counter[PassReason] = field(default_factory=Counter)
    torn_down: Counter[Teardown] = field(default_factory=Counter)
    events: int = 0  # ring-buffer records read
    map_full: int = 0  # decisions the full flow map could not take
    reconciles: int = 0  # flow map crossed off against a conntrack dump (events lost)
    reoffloaded: int = 0  # flows offloaded again after a ruleset change, once proven

    def summary(self) -> str:
        return (f"flows offloaded {self.offloaded}, passed {sum(self.passed.values())}, "
                f"torn down {dict(self.torn_down) or 'none'}")

    def report(self) -> dict[str, Any]:
        return {"offloaded": self.offloaded, "passed": sum(self.passed.values()),
                "passed_by_reason": {str(r): n for r, n in self.passed.items()},
                "torn_down": {str(r): n for r, n in self.torn_down.items()},
                "ring_events": self.events, "map_full_refused": self.map_full,
                "conntrack_reconciles": self.reconciles, "reoffloaded": self.reoffloaded}


class Latencies:
    """First packet to offloaded, in ms: the last LATENCY_SAMPLES as 4-byte floats."""

    def __init__(self, size: int = LATENCY_SAMPLES) -> None:
        self.size = size
        self.values = array("f")
        self._next = 0

    def note(self, ms: float) -> None:
        if len(self.values) < self.size:
            self.values.append(ms)
        else:  # a ring: overwrite the oldest
            self.values[self._next] = ms
            self._next = (self._next + 1) % self.size

    def percentiles(self) -> dict[str, float | int]:
        if not self.values:
            return {"n": 0}
        ordered = sorted(self.values)

        def pick(q: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

        return {"n": len(ordered), "p50": pick(0.5), "p99": pick(0.99),
                "max": round(ordered[-1], 3)}


@dataclass
class AgentFacts:
    """What the report says about the agent itself."""

    pid: int
    started: float
    interfaces: list[dict[str, Any]]  # {name, ifindex, hook}
    agent: dict[str, Any]  # counters
    latency: dict[str, float | int]
    why: Mapping[bytes, PassReason] = field(default_factory=dict)  # raw key -> why passed


def build_status(dp: Datapath, facts: AgentFacts, name_of: Callable[[int], str],
                 limit: int = 0) -> dict[str, Any]:
    """The whole report; ``flows`` sorted by bytes, the first ``limit`` only
    when given (counts always cover every flow)."""
    now_ns = time.monotonic_ns()
    offload_state = layout().consts["OFL_STATE_OFFLOAD"]
    v_flags, to_tc = layout().ffi.offsetof("struct ofl_verdict", "flags"), layout().const("OFL_V_TC")
    flows: list[dict[str, Any]] = []
    entries, pending, counts = _busiest(dp, limit) if limit else (
        dp.flow_entries(), dp.pending_entries(), None)
    for e in entries:
        offloaded = e.state == offload_state
        row = flow_row(e.key, "offloaded" if offloaded else "passed", e.packets, e.nbytes, name_of)
        row["last_seen_s"] = round((now_ns - e.last_seen_ns) / 1e9, 3) if e.last_seen_ns else None
        if offloaded:
            row["out_dev"] = name_of(e.oif)
            row["nat"] = nat_of(e.raw)
            # Which hook forwards it: TC after GRO for a hybrid bulk flow.
            row["via"] = "tc" if e.raw[v_flags] & to_tc else None
        else:  # None: passed before this agent started, or on probation
            why = facts.why.get(e.key.pack())
            row["why"] = str(why) if why is not None else None
        flows.append(row)
    for key, _first, packets, nbytes in pending:
        flows.append(flow_row(key, "pending", packets, nbytes, name_of))
    flows.sort(key=lambda r: r["bytes"], reverse=True)
    if counts is None:
        counts = _count_states(f["state"] for f in flows)
    used = counts["offloaded"] + counts["passed"]
    stats = dp.stats()
    return {
        "running": True,
        "pid": facts.pid,  # the agent's, also when a forked child answers
        "started": facts.started,
        "uptime_s": round(time.time() - facts.started, 1),
        "interfaces": facts.interfaces,
        "counts": counts,
        "flows_max": dp.flows.max_entries,
        "flows_used": used,
        "agent": facts.agent,
        "datapath": stats,
        "early_drop": drop_report(dp, stats, now_ns),
        # New-tuple events the datapath could not queue (ring buffer full);
        # the agent's sweep of the pending map finds those tuples anyway.
        "ring_buffer_drops": stats["event_drop"],
        "setup_latency_ms": facts.latency,
        "pinned": str(dp.pin_dir) if dp.pin_dir else None,
        "flows": flows[:limit] if limit else flows,
    }


def _busiest(dp: Datapath, limit: int) -> tuple[
        list[FlowEntry], list[tuple[FlowKey, int, int, int]], dict[str, int]]:
    """The ``limit`` busiest flows and pending tuples, and the counts of
    every state, from the maps' raw columns: a row (a key unpacked, names,
    addresses as text) is built only for what the report shows. With
    100,000 flows the full list took the status child over 10 s on a busy
    machine, for a report that shows 50."""
    lay = layout()
    off_state = lay.consts["OFL_STATE_OFFLOAD"]
    f_bytes, f_state = (lay.ffi.offsetof("struct ofl_flow", n) for n in ("bytes", "state"))
    p_bytes = lay.ffi.offsetof("struct ofl_pending", "bytes")
    ks, fs, ps = (lay.sizeof(f"struct {n}") for n in ("ofl_key", "ofl_flow", "ofl_pending"))
    best: list[tuple[int, bytes, bytes]] = []
    offloaded = passed = 0
    for kb, vb, n in dp.flows.batches():
        here = sum(1 for st in column(vb, fs, f_state, "I") if st == off_state)
        offloaded, passed = offloaded + here, passed + n - here
        best = _top(best, kb, vb, n, (ks, fs, f_bytes), limit)
    pend: list[tuple[int, bytes, bytes]] = []
    waiting = 0
    dp.settle_pending()
    for kb, vb, n in dp.pending.batches():
        waiting += n
        pend = _top(pend, kb, vb, n, (ks, ps, p_bytes), limit)
    entries = [flow_entry(k, v) for _b, k, v in best]
    pending = []
    for _b, k, v in pend:
        p = lay.from_bytes("struct ofl_pending", v)
        pending.append((FlowKey.unpack(k), p.first_seen_ns, p.packets, p.bytes))
    counts = {"offloaded": offloaded, "passed": passed, "pending": waiting,
              "total": offloaded + passed + waiting}
    return entries, pending, counts


def _top(best: list[tuple[int, bytes, bytes]], kb: bytes, vb: bytes, n: int,
         sizes: tuple[int, int, int], limit: int) -> list[tuple[int, bytes, bytes]]:
    """The ``limit`` largest (bytes, key, value) of ``best`` and one batch;
    ``sizes``: key size, value size, offset of the value's byte counter."""
    ks, vs, off = sizes
    nbytes = column(vb, vs, off, "Q")
    batch = [(nbytes[i], kb[i * ks : (i + 1) * ks], vb[i * vs : (i + 1) * vs])
             for i in heapq.nlargest(limit, range(n), key=nbytes.__getitem__)]
    return heapq.nlargest(limit, best + batch, key=lambda t: t[0])


def drop_report(dp: Datapath, stats: dict[str, int], now_ns: int) -> dict[str, Any]:
    """Packets dropped early by reason (the datapath's counters), the drop
    map's live entries and the busiest dropped sources."""
    entries = [(str(e.key.src), e.expires_ns, e.packets, e.nbytes) for e in dp.drop_entries()]
    return {"packets_by_reason": {str(r): stats.get(f"drop_{r.name.lower()}", 0)
                                  for r in DropReason},
            "entries": sum(1 for _s, expires, _p, _b in entries if expires > now_ns),
            "entries_max": dp.drops.max_entries,
            "busiest_sources": busiest_sources(entries, now_ns)}


def _count_states(states: Iterable[str]) -> dict[str, int]:
    c = Counter(states)
    return {"offloaded": c["offloaded"], "passed": c["passed"], "pending": c["pending"],
            "total": sum(c.values())}


def flow_row(key: FlowKey, state: str, packets: int, nbytes: int,
             name_of: Callable[[int], str]) -> dict[str, Any]:
    return {
        "family": "ipv4" if key.family == socket.AF_INET else "ipv6",
        "proto": {6: "tcp", 17: "udp"}.get(key.proto, str(key.proto)),
        "src": str(key.src), "dst": str(key.dst), "sport": key.sport, "dport": key.dport,
        "state": state, "packets": packets, "bytes": nbytes,
        "in_dev": name_of(key.ifindex),
        "vlan": [v for v in (key.vlan_outer, key.vlan_inner) if v],
        "pppoe_sid": key.pppoe_sid or None,
    }


def nat_of(raw: bytes) -> dict[str, Any] | None:
    """The NAT rewrite an offloaded flow's verdict carries, for people."""
    lay = layout()
    flow = lay.from_bytes("struct ofl_flow", raw)  # owns the memory v points into
    v = flow.v
    saddr, daddr = bytes(lay.ffi.buffer(v.nat_saddr)), bytes(lay.ffi.buffer(v.nat_daddr))
    n = 16 if any(saddr[4:]) or any(daddr[4:]) else 4
    out: dict[str, Any] = {}
    if v.flags & lay.const("OFL_V_SNAT"):
        out["src"] = str(ipaddress.ip_address(saddr[:n]))
    if v.flags & lay.const("OFL_V_DNAT"):
        out["dst"] = str(ipaddress.ip_address(daddr[:n]))
    if v.flags & lay.const("OFL_V_SPORT"):
        out["sport"] = socket.ntohs(v.nat_sport)
    if v.flags & lay.const("OFL_V_DPORT"):
        out["dport"] = socket.ntohs(v.nat_dport)
    return out or None
