"""One tuple's decision, applied.

Given a raw key the datapath reported (and the conntrack entry an event
brought, if any), ``Decider.decide`` asks conntrack when it must, gates on
``decision.offloadable``, resolves the path and writes the verdict, marks
the tuple pass for good with its reason, drops it early, or leaves it
waiting. It returns the ``Decision``; the loop only routes keys to it.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterable

from .config import Settings
from .conntrack import CtEntry, Tuple5, nat_target
from .datapath import FlowKey
from .decision import (
    Decision,
    Exclusions,
    PassReason,
    VerdictPacker,
    offloadable,
    source_nat_elsewhere,
    unresolved,
)
from .drops import RulesetFacts
from .earlydrop import EarlyDrop
from .errors import ResolveError
from .flowstate import FlowState, describe, key_id, key_tuple
from .flowtable import FlowTable
from .nftwatch import Probation
from .parts import Parts
from .records import Records
from .routing import Egress, NotYet
from .status import Counters, Latencies

log = logging.getLogger(__name__)

MAP_FULL_BACKOFF_NS = 2_000_000_000  # a key the full map refused is asked about again after
PATHS_KEPT = 4096  # paths remembered (all dropped when full)
_ANY4 = ipaddress.IPv4Address(0)
FIRST_SEEN_KEPT = 65536  # ring stamps of undecided keys kept (about 100 bytes each)


class Decider:
    """``settings``, ``exclusions`` and ``ruleset`` are replaced by the loop
    on reload, re-attach and ruleset change."""

    def __init__(self, settings: Settings, parts: Parts, state: FlowState, table: FlowTable,
                 counters: Counters, hook_of: Callable[[int], str | None]) -> None:
        self.settings = settings
        self.dp, self.resolver, self.ct, self.net = parts.dp, parts.resolver, parts.ct, parts.net
        self.state, self.table, self.counters = state, table, counters
        self.hook_of = hook_of
        self.exclusions = Exclusions()
        self.latencies = Latencies()
        self.probation = Probation()
        self.early_drop = EarlyDrop(self.dp, self.resolver)
        self.nft = parts.nft
        self.ruleset = RulesetFacts()
        self.learn_ruleset()
        # raw key -> the datapath's stamp on its first ring record (the
        # pending entry's first_seen_ns): the setup latency without a map
        # lookup per flow. Keys not in it (their record was lost, or found
        # by the sweep) are looked up in the pending map.
        self.first_seen: dict[bytes, int] = {}
        self.packer = VerdictPacker()
        self.rec = Records()
        self._v_flags, self._young, self._tc = self.rec.v_flags, self.rec.flag_young, self.rec.flag_tc
        self._paths: dict[tuple[object, ...], Egress | PassReason] = {}
        self._warned: set[int] = set()  # devices whose shaper XDP bypasses, said once

    def learn_ruleset(self) -> None:
        """Read the ruleset as it is now, once: what early drop may learn,
        and the mark setters the resolver routes flows with (handed to it:
        it then asks the kernel nothing per lookup)."""
        found = self.nft.scan()
        self.ruleset = found.facts
        self.resolver.ruleset.update(found.marks)

    def noted(self, raw: bytes, stamp_ns: int) -> None:
        """The ring reported ``raw`` for the first time, stamped ``stamp_ns``."""
        first = self.first_seen
        first[raw] = stamp_ns
        if len(first) > FIRST_SEEN_KEPT:
            del first[next(iter(first))]

    def decide_with(self, raw: bytes, entry: CtEntry) -> Decision:
        """Decide with a conntrack entry an event brought (either direction)."""
        return self.decide(raw, (entry, not self._is_tuple(raw, entry.orig)))

    def decide(self, raw: bytes, found: tuple[CtEntry, bool] | None = None) -> Decision:
        """Offload the tuple of raw key ``raw``, pass it for good, or leave it waiting."""
        if self.probation and self.probation.holds(raw):
            # Handed back after a ruleset change, not yet seen forwarded.
            self.dp.mark_pass(FlowKey.unpack(raw))
            self.state.decided(raw, time.monotonic_ns())
            return Decision.PASS
        if found is None:
            key = FlowKey.unpack(raw)
            found = self.ct.get(key_tuple(key), self.state.zone(key_id(key)))
            if found is None:
                return self._maybe_drop(key)
        entry, is_reply = found
        gate = offloadable(entry, offload_udp=self.settings.offload_udp)
        if isinstance(gate, PassReason):
            return self._pass(raw, FlowKey.unpack(raw), gate)
        if gate is Decision.WAIT:
            return gate
        return self._offload(raw, entry, is_reply)

    def _offload(self, raw: bytes, entry: CtEntry, is_reply: bool) -> Decision:
        """Resolve the path of an offloadable tuple and write its verdict.
        A FlowKey is built only when the path is not cached: the key's
        tuple is the entry's tuple of its direction."""
        target = nat_target(entry, is_reply)
        path = self._path_cached(raw, target, entry.mark)
        if isinstance(path, PassReason):
            return self._pass(raw, FlowKey.unpack(raw), path)
        if path is None:
            return Decision.WAIT
        own = entry.reply if is_reply else entry.orig
        if own.proto == socket.IPPROTO_TCP:
            tag = raw
            self.ct.set_liberal(own, is_reply, entry.zone, tag)
            if tag in self.ct.gone:  # answered at once: the entry went away meanwhile
                self.ct.gone.remove(tag)
                return Decision.WAIT
        first_seen = self.first_seen.get(raw) or self.dp.pending_first_seen(FlowKey.unpack(raw))
        now = time.monotonic_ns()
        # Stamped now, so a flow that never carries a packet still idles out.
        tc = self._tc if self.tc_only(self.rec.ifindex(raw), path.oif) else 0
        value = self.packer.pack(raw, own, path, target, entry, is_reply, now, tc)
        if not self.table.offload_packed(raw, path.oif, value):
            self.state.defer(raw, now + MAP_FULL_BACKOFF_NS)
            return Decision.WAIT
        if first_seen:
            self.latencies.note((now - first_seen) / 1e6)
        self.first_seen.pop(raw, None)
        if not value[self._v_flags] & self._young:  # a young one's: at the sweep's due instant
            self.ct.offloaded(raw, is_reply, entry.zone, entry.assured)  # its long timeout: next tick
        self.net.used(path.l3_oif, path.nexthop, path.l2.dmac)
        self.state.decided(raw, now)
        self.counters.offloaded += 1
        if log.isEnabledFor(logging.DEBUG):  # describe() costs more than the rest of the line
            log.debug("offload %s -> ifindex %d", describe(FlowKey.unpack(raw)), path.oif)
        return Decision.OFFLOAD

    def _is_tuple(self, raw: bytes, t: Tuple5) -> bool:
        """Whether raw key ``raw`` is tuple ``t``'s direction (addresses and ports)."""
        rec = self.rec
        n = len(t.src.packed)
        return (raw[rec.k_saddr : rec.k_saddr + n] == t.src.packed
                and raw[rec.k_daddr : rec.k_daddr + n] == t.dst.packed
                and int.from_bytes(raw[rec.k_sport : rec.k_sport + 2], "big") == t.sport
                and int.from_bytes(raw[rec.k_sport + 2 : rec.k_sport + 4], "big") == t.dport)

    def _path_cached(self, raw: bytes, target: Tuple5, mark: int) -> Egress | PassReason | None:
        """``path_of`` for a new flow, remembered per ingress attributes,
        addresses before and after NAT and mark (and ports, when a policy
        rule matches on them) until ``forget_paths``: the flows of one host
        pair share a path. An answer of None (not yet) is not kept."""
        sp = self.rec.k_sport
        ck = ((raw if self.resolver.routes_by_port() else raw[:sp] + raw[sp + 4 :]),
              target.src, target.dst, mark)
        paths = self._paths
        hit = paths.get(ck)
        if hit is not None:
            return hit
        path = self.path_of(FlowKey.unpack(raw), target, mark)
        if path is not None:
            if len(paths) >= PATHS_KEPT:
                paths.clear()
            paths[ck] = path
        return path

    def warm(self, ifindexes: Iterable[int]) -> None:
        """Fill the resolver's caches that every first flow needs, while the
        loop is otherwise idle: the walk up from each attached device, the
        local addresses and the policy rules. Read cold (at start-up, or after a change
        dropped them), they cost the first flow some 13 ms of netlink
        dumps, and every flow arriving meanwhile waits behind it. Cached,
        this is a few dictionary lookups."""
        for index in ifindexes:
            probe = FlowKey(ifindex=index, family=socket.AF_INET, proto=socket.IPPROTO_UDP,
                            src=_ANY4, dst=_ANY4, sport=0, dport=0)
            try:
                self.resolver.ingress(probe)
            except ResolveError as exc:  # decided (and explained) per flow later
                log.debug("warming the walk up from ifindex %d: %s", index, exc)
        self.resolver.address_owner(_ANY4)
        self.resolver.routes_by_port()  # reads the policy rules
        self.resolver.queueing()  # the qdiscs: which flows a shaper needs in TC

    def tc_only(self, iif: int, oif: int) -> bool:
        """Whether a flow entering by ``iif`` and leaving by device ``oif``
        (the verdict's) must be forwarded by TC, never by XDP. The verdict's
        OFL_V_TC flag then makes XDP pass the flow's packets; TC, where the
        input device has it (hybrid), forwards them as skbs, else the kernel
        does.

        - Under ``hook auto``, when ``oif`` is a veth: a frame XDP redirects
          into a veth is dropped unless the veth's peer has an XDP program or
          GRO on, and a container's end has neither by default.
        - When ``iif``'s hook is hybrid and ``oif`` has a shaper (SQM's cake,
          htb, ...: routing.PLAIN_QDISCS): an XDP redirect never reaches a
          qdisc, a TC redirect goes through the device's transmit path.
        - When ``iif``'s hook is hybrid and ``iif`` has an ``ingress`` qdisc
          (SQM's redirect of downloads to its ifb): XDP would forward the
          packets before that redirect sees them; passed to TC's hook, they
          meet the redirect first (docs/openwrt.md, SQM)."""
        hook = self.settings.hook
        if hook == "auto":
            link = self.resolver.cached_link(oif)
            if link is not None and link.kind == "veth":
                return True
        elif hook != "hybrid":  # xdp, tc: no device has both hooks (asked per new flow)
            return False
        if self.hook_of(iif) != "hybrid":
            return False
        queueing = self.resolver.queueing()
        return oif in queueing.shapers or iif in queueing.ingress

    def forget_paths(self) -> None:
        """The network, the configuration or the ruleset changed: paths are
        resolved afresh (the resolver keeps its own finer-grained caches)."""
        self._paths.clear()

    def path_of(self, key: FlowKey, target: Tuple5, mark: int) -> Egress | PassReason | None:
        """The egress of ``key``'s packets, rewritten to ``target`` and routed
        with conntrack mark ``mark``, as the resolver knows it now; why it
        must stay with the kernel; or None when that cannot be told yet (a
        neighbour or FDB entry missing). New decisions and the re-resolve
        pass after a network change (offloader/reresolve.py) both ask this."""
        # TC may redirect into upper devices; XDP goes to the lowest.
        hook = self.hook_of(key.ifindex)
        path = self._resolved(key, target, mark, full=hook != "tc")
        if isinstance(path, Egress) and hook != "tc":
            path = self._past_shapers(key, target, mark, path, hook)
        if not isinstance(path, Egress):
            return path
        if self.exclusions.excludes(key.src, target.dst, (key.ifindex, path.l3_oif)):
            return PassReason.EXCLUDED
        if source_nat_elsewhere(key, target, self.resolver.address_owner(target.src),
                                path.l3_oif):
            return PassReason.NAT_DEVICE
        return path

    def _resolved(self, key: FlowKey, target: Tuple5, mark: int, *,
                  full: bool) -> Egress | PassReason | None:
        try:
            return self.resolver.resolve(key, target.dst, full=full, mark=mark)
        except NotYet as exc:
            log.debug("%s: %s, retrying", describe(key), exc)
            return None
        except ResolveError as exc:
            log.debug("%s: %s", describe(key), exc)
            return unresolved(exc)

    def _past_shapers(self, key: FlowKey, target: Tuple5, mark: int, path: Egress,
                      hook: str | None) -> Egress | PassReason | None:
        """A flow whose way out down to the lowest device has a shaper.
        Hybrid: a shaper on the lowest device sees the flow through TC
        (``tc_only``); one above it (``pppoe-wan``, ``wan.7``, a DSA user
        port), when TC's path reaches that device, sees it as with ``hook
        tc``: the flow is forwarded by TC into that device's transmit path.
        Where TC's path does not reach it (a shaper on a bridge: TC
        redirects into the port the FDB names) the kernel keeps the flow.
        XDP alone cannot keep a shaper: said once per device."""
        shaped = self.resolver.shaped_on_the_way(path)
        if hook in ("xdp", "xdpgeneric"):
            bypassed = [shaped] if shaped else []
            if key.ifindex in self.resolver.queueing().ingress:
                bypassed.append((key.ifindex, "an ingress qdisc"))
            for index, kind in bypassed:
                self._warn_bypassed(index, kind, hook)
            return path
        if hook != "hybrid":
            return path
        if shaped is None or shaped[0] == path.oif:
            return path
        upper = self._resolved(key, target, mark, full=False)
        if isinstance(upper, Egress) and upper.oif == shaped[0]:
            return upper
        return PassReason.SHAPED if isinstance(upper, Egress) else upper

    def _warn_bypassed(self, index: int, kind: str, hook: str) -> None:
        if index in self._warned:
            return
        if len(self._warned) >= PATHS_KEPT:
            self._warned.clear()
        self._warned.add(index)
        link = self.resolver.cached_link(index)
        log.warning("%s on %s: hook %s forwards offloaded flows past it; hook 'hybrid' or 'tc' "
                    "keeps it (docs/openwrt.md, SQM and QoS)", kind, link.name if link else index,
                    hook)

    def _pass(self, raw: bytes, key: FlowKey, why: PassReason) -> Decision:
        if not self.table.mark_pass(key, why):
            self.state.defer(raw, time.monotonic_ns() + MAP_FULL_BACKOFF_NS)
            return Decision.WAIT
        self.first_seen.pop(raw, None)
        self.state.decided(raw, time.monotonic_ns())
        self.counters.passed[why] += 1
        log.debug("pass %s: %s", describe(key), why)
        return Decision.PASS

    def _maybe_drop(self, key: FlowKey) -> Decision:
        """No conntrack entry: drop early what the kernel drops anyway."""
        if self.early_drop.consider(key, self.settings, self.ruleset) is None:
            return Decision.WAIT
        self.state.decided(key.pack(), time.monotonic_ns())
        return Decision.DROP
