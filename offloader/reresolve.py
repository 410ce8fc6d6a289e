"""Offloaded flows resolved again after a route, rule, address or link change.

A network change used to hand every offloaded flow back to the kernel. Now
the agent walks the flow map and asks, for each offloaded flow the change
could affect, the same question a new decision asks (``Decider.path_of``:
route with the connection's mark, neighbour, the walk down, exclusions, the
NAT source check), with the resolver's caches already dropped:

  same path             the entry is left alone (its packets never see the slow path)
  another path          the entry's verdict is rewritten in place (``rerouted``)
  no longer offloadable handed back (``Teardown.NETWORK``), decided afresh by its next packet

``Scope`` says which flows a batch of changes could re-route (pure, tested
without root): a route's prefix, a rule's selector, an address's own flows
(sent or source-NATed to it), or everything (lost events, an address on a
device under a macvlan). ``Pass`` is the walk: it reads the map
a slice at a time, at most ``SLICE_BUDGET_S`` of work per loop tick, and
coalesces: changes that come while a pass runs queue one more pass (the flows
already walked were resolved before them), a burst costs two passes at most.
Flows decided while a pass runs are fresh already: the caches were dropped
when the change was read.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from .bpfobj import BPF_EXIST
from .conntrack import Tuple5
from .datapath import Datapath, FlowKey, Verdict
from .decision import PassReason, Teardown
from .errors import MapError, OffloadError
from .flowtable import FlowTable
from .layout import layout
from .nftwatch import Probation
from .records import Records
from .routing import Egress, Resolver

log = logging.getLogger(__name__)

SLICE_BUDGET_S = 0.005  # work per loop tick: the loop answers everything else in between
SLICE_ENTRIES = 256  # map entries read per batch lookup
SETTLE_S = 0.02  # a pass starts this long after the first change: a burst is one pass
IDLE_S = 3600.0  # the pass's timer interval while no pass is wanted (hurried by changes)
SELECTORS_KEPT = 64  # beyond this many changes in one batch, the scope is everything
FIB_RULE_INVERT = 0x2  # uapi fib_rules.h: "not" in `ip rule`

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Rule attributes that select no packets (what the rule does, or bookkeeping).
# Any attribute not here and not a selector below makes a rule change re-resolve
# every flow (FRA_OIFNAME, FRA_UID_RANGE, FRA_L3MDEV, FRA_TUN_ID, ... and
# whatever a later kernel adds).
RULE_NON_SELECTORS = frozenset({"FRA_UNSPEC", "FRA_PRIORITY", "FRA_TABLE", "FRA_GOTO",
                                "FRA_SUPPRESS_PREFIXLEN", "FRA_SUPPRESS_IFGROUP",
                                "FRA_PROTOCOL", "FRA_FLOW", "FRA_PAD"})
RULE_SELECTORS = frozenset({"FRA_DST", "FRA_SRC", "FRA_IIFNAME", "FRA_FWMARK", "FRA_FWMASK",
                            "FRA_IP_PROTO", "FRA_SPORT_RANGE", "FRA_DPORT_RANGE"})


def _prefix(family: int, addr: str | None, length: int) -> tuple[int, int]:
    """(value, mask) of a prefix over the 16-byte address word of a key
    (an IPv4 address in its first 4 bytes)."""
    if not addr or not length:
        return 0, 0
    width = 32 if family == socket.AF_INET else 128
    net = ipaddress.ip_network(f"{addr.split('%')[0]}/{length}", strict=False)
    mask = ((1 << length) - 1) << (width - length) << (128 - width)
    return int(net.network_address) << (128 - width), mask


def _range(value: Any) -> tuple[int, int] | None:
    """A rule's port range as pyroute2 gives it ("start:end", or a dict)."""
    if value is None:
        return None
    if isinstance(value, str):
        lo, _, hi = value.partition(":")
        return int(lo), int(hi or lo)
    return int(value["start"]), int(value["end"])


class Lookup(NamedTuple):
    """What a flow's route lookup carries, as a selector compares it:
    addresses as 128-bit words (IPv4 in the top 32 bits), ``mark`` the
    packet mark (None: unknown, it may match any), ``iif`` the ingress L3
    device's name (asked only when a selector names one)."""

    family: int
    src: int
    dst: int  # after DNAT
    nat_src: int  # after SNAT (the source itself without)
    proto: int
    sport: int
    dport: int
    mark: int | None
    iif: Callable[[], str | None]  # None: unknown (matches)


@dataclass(frozen=True, slots=True)
class Selector:
    """The flows one changed route or rule could re-route: those whose
    lookup matches all of its fields (a route: its destination prefix)."""

    family: int
    dst: tuple[int, int] = (0, 0)  # (value, mask) over the address word
    src: tuple[int, int] = (0, 0)
    nat_src: tuple[int, int] = (0, 0)  # the source after SNAT (an address change)
    iif: str | None = None
    fwmark: tuple[int, int] | None = None  # (value, mask)
    proto: int | None = None
    sport: tuple[int, int] | None = None
    dport: tuple[int, int] | None = None

    def covers_dst(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Whether a destination lies in the destination prefix."""
        family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
        return family == self.family and address_word(addr) & self.dst[1] == self.dst[0]

    def matches(self, f: Lookup) -> bool:
        if f.family != self.family:
            return False
        if f.dst & self.dst[1] != self.dst[0] or f.src & self.src[1] != self.src[0]:
            return False
        if f.nat_src & self.nat_src[1] != self.nat_src[0]:
            return False
        if self.fwmark is not None and f.mark is not None and (
                f.mark & self.fwmark[1]) != self.fwmark[0]:
            return False
        if self.proto is not None and f.proto != self.proto:
            return False
        if self.sport is not None and not self.sport[0] <= f.sport <= self.sport[1]:
            return False
        if self.dport is not None and not self.dport[0] <= f.dport <= self.dport[1]:
            return False
        if self.iif is None:
            return True
        name = f.iif()
        return name is None or name == self.iif


def address_word(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    """An address as the 128-bit word a selector compares (IPv4 in the top 32 bits)."""
    return int(addr) << (96 if addr.version == 4 else 0)


def route_selector(msg: Any) -> Selector:
    """A route added, replaced or removed changes the lookup only of
    destinations inside its prefix (longest prefix match), in any table."""
    family = msg["family"]
    return Selector(family, dst=_prefix(family, msg.get("RTA_DST"), msg["dst_len"]))


def rule_selector(msg: Any) -> Selector | None:
    """The flows a rule added or removed could re-route: those its selector
    matches (a rule a lookup does not match is skipped, whatever it does).
    None (every flow) for a selector this does not understand, or inverted."""
    if msg["flags"] & FIB_RULE_INVERT:
        return None
    names = {name for name, _value in msg["attrs"]}
    if names - RULE_NON_SELECTORS - RULE_SELECTORS:
        return None
    family = msg["family"]
    mark, mask = msg.get("FRA_FWMARK"), msg.get("FRA_FWMASK")
    fwmark = None
    if mark is not None or mask is not None:
        m = 0xFFFFFFFF if mask is None else int(mask)
        fwmark = (int(mark or 0) & m, m)
    # A rule on TOS narrows nothing here: the key has no TOS (the lookup
    # tries every value the rules tell apart).
    return Selector(family, dst=_prefix(family, msg.get("FRA_DST"), msg["dst_len"]),
                    src=_prefix(family, msg.get("FRA_SRC"), msg["src_len"]),
                    iif=msg.get("FRA_IIFNAME"), fwmark=fwmark, proto=msg.get("FRA_IP_PROTO"),
                    sport=_range(msg.get("FRA_SPORT_RANGE")),
                    dport=_range(msg.get("FRA_DPORT_RANGE")))


def address_selectors(msg: Any) -> list[Selector]:
    """A local address added or removed changes the decision of the flows
    sent to it (local now, or no longer) and of those source-NATed to it
    (the NAT source check asks its device). Its prefix route comes as a
    route event of its own."""
    family = msg["family"]
    addr = (msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS") or "").split("%")[0]
    exact = _prefix(family, addr, 32 if family == socket.AF_INET else 128)
    return [Selector(family, dst=exact), Selector(family, nat_src=exact)]


@dataclass
class Scope:
    """Which offloaded flows a batch of changes could re-route."""

    everything: bool = False
    selectors: list[Selector] = field(default_factory=list)

    def add(self, sel: Selector | None) -> None:
        """One change; None: it could re-route any flow."""
        if sel is None or len(self.selectors) >= SELECTORS_KEPT:
            self.everything = True
            self.selectors.clear()
        elif not self.everything and sel not in self.selectors:
            self.selectors.append(sel)

    def merge(self, other: Scope) -> None:
        if other.everything:
            self.add(None)
        for sel in other.selectors:
            self.add(sel)

    def __bool__(self) -> bool:
        return self.everything or bool(self.selectors)

    def matches(self, f: Lookup) -> bool:
        return self.everything or any(s.matches(f) for s in self.selectors)


class Outcome(NamedTuple):
    """What one pass did."""

    checked: int  # offloaded flows the scope selected and were resolved again
    kept: int
    rerouted: int
    torn_down: int
    seconds: float  # from the first slice to the last


class Offsets:
    """Where a raw flow map entry keeps what a selector compares."""

    def __init__(self) -> None:
        lay = layout()
        off = lay.ffi.offsetof
        self.key_size = lay.ffi.sizeof("struct ofl_key")
        self.flow_size = lay.ffi.sizeof("struct ofl_flow")
        self.k_family = off("struct ofl_key", "family")
        self.k_proto = off("struct ofl_key", "proto")
        self.k_sport = off("struct ofl_key", "sport")
        self.k_dport = off("struct ofl_key", "dport")
        self.k_saddr = off("struct ofl_key", "saddr")
        self.k_daddr = off("struct ofl_key", "daddr")
        self.f_state = off("struct ofl_flow", "state")
        self.f_seen = off("struct ofl_flow", "seen")
        self.seen_ended = lay.const("OFL_SEEN_FIN") | lay.const("OFL_SEEN_RST")
        self.v_flags = off("struct ofl_verdict", "flags")
        self.v_mark = off("struct ofl_verdict", "ct_mark")
        self.v_nat_daddr = off("struct ofl_verdict", "nat_daddr")
        self.v_nat_saddr = off("struct ofl_verdict", "nat_saddr")
        self.state_offload = lay.const("OFL_STATE_OFFLOAD")
        self.flag_dnat = lay.const("OFL_V_DNAT")
        self.flag_snat = lay.const("OFL_V_SNAT")

    def lookup(self, k: bytes, v: bytes, packet_mark: Callable[[int], int | None],
               iif: Callable[[], str | None]) -> Lookup:
        flags = v[self.v_flags]
        daddr = (v[self.v_nat_daddr : self.v_nat_daddr + 16] if flags & self.flag_dnat
                 else k[self.k_daddr : self.k_daddr + 16])
        saddr = int.from_bytes(k[self.k_saddr : self.k_saddr + 16], "big")
        nat_src = (int.from_bytes(v[self.v_nat_saddr : self.v_nat_saddr + 16], "big")
                   if flags & self.flag_snat else saddr)
        return Lookup(k[self.k_family], saddr, int.from_bytes(daddr, "big"), nat_src,
                      k[self.k_proto],
                      int.from_bytes(k[self.k_sport : self.k_sport + 2], "big"),
                      int.from_bytes(k[self.k_dport : self.k_dport + 2], "big"),
                      packet_mark(int.from_bytes(v[self.v_mark : self.v_mark + 4], "little")), iif)

    def offloaded(self, v: bytes) -> bool:
        return int.from_bytes(v[self.f_state : self.f_state + 4], "little") == self.state_offload

    def live(self, v: bytes) -> bool:
        """Offloaded and not closing: after a FIN or RST the datapath passes
        the rest of that direction to the kernel, and the next sweep removes
        the entry (counted there as the TCP flags'). Re-resolving it would
        change nothing a packet sees, only count a hand-back twice."""
        return (self.offloaded(v)
                and not int.from_bytes(v[self.f_seen : self.f_seen + 4], "little")
                & self.seen_ended)


# judge(raw key, raw flow): True kept, False rerouted, None handed back
Judge = Callable[[bytes, bytes], bool | None]


class Pass:
    """The re-resolve walk over the flow map, a slice per call of ``step``.

    ``batches`` reads the map from the start ((keys, values, count) chunks;
    a hash map's batch cursor is a bucket, so an entry present all along is
    seen exactly once even while others come and go); ``judge`` re-resolves
    one offloaded flow the scope selected; ``lookups`` gives, once a slice,
    what builds the values the scope compares from an entry; ``done`` is
    told each finished pass."""

    def __init__(self, batches: Callable[[], Iterator[tuple[bytes, bytes, int]]],
                 judge: Judge, lookups: Callable[[], Callable[[bytes, bytes], Lookup]],
                 done: Callable[[Outcome], None] | None = None, *,
                 budget_s: float = SLICE_BUDGET_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.batches, self.judge, self.lookups, self.done = batches, judge, lookups, done
        self.budget_s, self.clock = budget_s, clock
        self.scope: Scope | None = None  # the running pass's
        self.queued = Scope()  # changes since it started
        self.passes = 0
        self._walk: Iterator[tuple[bytes, bytes, int]] | None = None
        self._chunk: tuple[bytes, bytes, int] = (b"", b"", 0)
        self._at = 0
        self._counts = [0, 0, 0, 0]
        self._started = 0.0
        self.off = Offsets()

    @property
    def busy(self) -> bool:
        return self.scope is not None or bool(self.queued)

    def wanted(self, scope: Scope) -> None:
        """Changes were read: re-resolve what they could re-route (after
        the running pass, if one runs)."""
        self.queued.merge(scope)

    def step(self) -> bool:
        """One slice; True while work is left."""
        if self.scope is None:
            if not self.queued:
                return False
            self.scope, self.queued = self.queued, Scope()
            self._walk, self._chunk, self._at = self.batches(), (b"", b"", 0), 0
            self._counts = [0, 0, 0, 0]
            self._started = self.clock()
        end = self.clock() + self.budget_s
        scope, off, counts = self.scope, self.off, self._counts
        ks, vs = off.key_size, off.flow_size
        lookup = None if scope.everything else self.lookups()
        while self.clock() < end:
            kb, vb, n = self._chunk
            if self._at >= n:
                assert self._walk is not None
                nxt = next(self._walk, None)
                if nxt is None:
                    self._finish()
                    return self.busy
                self._chunk, self._at = nxt, 0
                continue
            for i in range(self._at, min(n, self._at + 8)):
                k, v = kb[i * ks : (i + 1) * ks], vb[i * vs : (i + 1) * vs]
                if not off.live(v) or (lookup and not scope.matches(lookup(k, v))):
                    continue
                try:
                    verdict = self.judge(k, v)
                except (OffloadError, OSError) as exc:  # one flow's error stops no pass
                    log.warning("re-resolving a flow: %s", exc)
                    verdict = True
                counts[0] += 1
                counts[1 if verdict else 2 if verdict is False else 3] += 1
            self._at = min(n, self._at + 8)
        return True

    def _finish(self) -> None:
        c = self._counts
        out = Outcome(c[0], c[1], c[2], c[3], self.clock() - self._started)
        self.scope, self._walk, self._chunk = None, None, (b"", b"", 0)
        self.passes += 1
        log.debug("re-resolve pass: %s", out)
        if self.done:
            self.done(out)



class Rerouter:
    """One offloaded flow resolved again, and the verdict applied to its entry.

    ``path_of`` is the decision's own path question (``Decider.path_of``);
    ``used`` notes the next hop a flow now goes to (neighbour events)."""

    def __init__(self, dp: Datapath, rec: Records,
                 path_of: Callable[[FlowKey, Tuple5, int], Egress | PassReason | None],
                 used: Callable[[int, Any, bytes], None],
                 tc_only: Callable[[int, int], bool]) -> None:
        self.dp, self.rec, self.path_of, self.used = dp, rec, path_of, used
        self.tc_only = tc_only  # Decider.tc_only: a way in or out XDP must not take
        lay = layout()
        self.verdict_size = lay.ffi.sizeof("struct ofl_verdict")
        self.flag_tc = lay.const("OFL_V_TC")
        self.off = Offsets()

    def judge(self, k: bytes, v: bytes) -> bool | None:
        """True: the same path, the entry untouched; False: rewritten to the
        new one; None: no longer offloadable, the entry removed."""
        key = FlowKey.unpack(k)
        old = Verdict.unpack(key, v)
        target = Tuple5(key.proto, old.nat_src or key.src, old.nat_dst or key.dst,
                        key.sport if old.nat_sport is None else old.nat_sport,
                        key.dport if old.nat_dport is None else old.nat_dport)
        path = self.path_of(key, target, old.mark)
        if not isinstance(path, Egress):
            # No route, unreachable, a next hop not resolved yet, the NAT
            # source elsewhere: the kernel forwards it (and decides it anew).
            self.dp.flows.delete(k)
            return None
        self.used(path.l3_oif, path.nexthop, path.l2.dmac)
        if (path.oif, path.l2, path.mtu) == (old.oif, old.l2, old.mtu) and (
                v[self.rec.v_flags] & self.flag_tc or not self.tc_only(key.ifindex, path.oif)):
            return True  # the same way out, and TC's already if it must be (a shaper came)
        self._rewrite(k, replace(old, oif=path.oif, l2=path.l2, mtu=path.mtu))
        return False

    def _rewrite(self, k: bytes, verdict: Verdict) -> None:
        """The new verdict over the entry as it is now: counters, last seen,
        state and the datapath's seen flags kept (read just before the
        write: what the datapath adds in between is lost, a few packets'
        counts at most), and the hybrid hook's TC flag while TC can still
        forward the flow, or where the new lowest device must not be XDP's
        (``tc_only``)."""
        fresh = self.dp.flows.lookup(k)
        if fresh is None or not self.off.offloaded(fresh):
            return  # gone or handed back meanwhile
        new = verdict.pack()
        i, n = self.rec.v_flags, self.verdict_size
        flags = new[i]
        if (fresh[i] & self.flag_tc and self.rec.tc_can_forward(k, new)) \
                or self.tc_only(verdict.key.ifindex, verdict.oif):
            flags |= self.flag_tc
        value = new[:i] + bytes([flags]) + new[i + 1 : n] + fresh[n:]
        self.dp.add_tx_port(verdict.oif)
        try:
            self.dp.flows.update(k, value, BPF_EXIST)
        except MapError as exc:
            if exc.errno != errno.ENOENT:
                raise


# Pass entries whose reason a route can change: removed on a route, rule,
# address or qdisc change, so that their next packet is decided afresh.
ROUTE_PASSES = frozenset({PassReason.NO_PATH, PassReason.POLICY_MARK, PassReason.POLICY_TOS,
                          PassReason.NAT_DEVICE, PassReason.EXCLUDED, PassReason.SHAPED})


class Reresolver:
    """The agent's re-resolving: what a change drops at once, the pass it
    asks for, each verdict applied and counted, and what ``status`` shows.
    ``torn_down`` is the agent's teardown counter."""

    def __init__(self, dp: Datapath, rec: Records, resolver: Resolver, table: FlowTable,
                 probation: Probation,
                 path_of: Callable[[FlowKey, Tuple5, int], Egress | PassReason | None],
                 used: Callable[[int, Any, bytes], None], torn_down: dict[Teardown, int],
                 tc_only: Callable[[int, int], bool]) -> None:
        self.dp, self.resolver, self.table, self.probation = dp, resolver, table, probation
        self.rerouter = Rerouter(dp, rec, path_of, used, tc_only)
        self.walk = Pass(lambda: dp.flows.batches(SLICE_ENTRIES), self._judge, self._lookups,
                         self._done)
        self.torn_down = torn_down
        # told the (key, value) of each offloaded flow handed back (Sweeper.hand_back)
        self.handed_back: Callable[[list[tuple[bytes, bytes]]], None] = lambda _pairs: None
        self.rerouted = 0
        self.last: Outcome | None = None

    def interval(self) -> float:
        """The timer's: a slice every loop round while a pass is wanted."""
        return 0.0 if self.walk.busy else IDLE_S

    def step(self) -> None:
        self.walk.step()

    def changed(self, scope: Scope) -> None:
        """Changes were read: the pass entries a route decided go now (their
        next packet is decided with the new routes), the offloaded flows in
        ``scope`` are resolved again by the pass."""
        keys = [raw for raw, why in self.table.why.items()
                if why in ROUTE_PASSES and not self.probation.holds(raw)]
        self.table.forget(keys)
        self.dp.flows.delete_batch(keys)
        self.walk.wanted(scope)

    def report(self) -> dict[str, Any]:
        last = self.last
        return {"rerouted": self.rerouted, "reresolve_passes": self.walk.passes,
                "last_reresolve": last._asdict() if last else None}

    def _judge(self, raw_key: bytes, raw_flow: bytes) -> bool | None:
        kept = self.rerouter.judge(raw_key, raw_flow)
        if kept is None:
            self.torn_down[Teardown.NETWORK] += 1
            self.handed_back([(raw_key, raw_flow)])
        elif not kept:
            self.rerouted += 1
        return kept

    def _lookups(self) -> Callable[[bytes, bytes], Lookup]:
        """What a scope compares, for one slice (the ruleset's mark setters
        are asked once a slice)."""
        setters, off = self.resolver.ruleset.setters(), self.walk.off
        return lambda k, v: off.lookup(k, v, setters.packet_mark,
                                       functools.partial(self._ingress_name, k))

    def _ingress_name(self, raw_key: bytes) -> str | None:
        try:
            return self.resolver.link(self.resolver.ingress(FlowKey.unpack(raw_key)).l3_iif).name
        except OffloadError:
            return None

    def _done(self, out: Outcome) -> None:
        self.last = out
        log.debug("network change: %d flows resolved again in %.3f s: %d kept, %d rerouted, "
                  "%d handed back", out.checked, out.seconds, out.kept, out.rerouted,
                  out.torn_down)
