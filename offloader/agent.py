"""The agent: one event loop that decides, offloads and tears down flows.

Inputs, all on one selector, no threads:
  ring buffer      a tuple the datapath has not seen before (or still pending)
  conntrack events NEW/UPDATE (a waiting tuple may now be offloadable),
                   DESTROY (its flows must go)
  rtnetlink events route, rule, address changes (the offloaded flows they
                   could re-route are resolved again, a slice a tick), link
                   changes (every flow goes), neighbour and FDB changes (the
                   flows to that MAC go)
  nftables events  a ruleset change: drops forgotten, flows handed back on probation
  control socket   status and flush requests
  signals          SIGTERM/SIGINT stop, SIGHUP reloads the configuration
  timers           heartbeat (the datapath's fail-safe), sweep, re-resolve slices

The mechanism (selector, timers, signals) is loop.py's; one tuple's
decision is decider.py's. The parts say what should happen; the agent
applies it (see docs/design.md, "Where a change belongs"). ``run_agent``
opens every collaborator through parts.py, the single-agent lock first,
and closes whatever it opened.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any

from . import bpfobj
from .attach import Attacher
from .config import Settings, network_devices, redecide_needed
from .conntrack import CtEntry
from .decider import Decider
from .decision import Decision, Exclusions, Teardown, closing
from .errors import OffloadError
from .flowstate import FlowState, Seen
from .flowtable import FlowTable
from .lean import settle
from .loop import EventLoop, Timer, guarded
from .netwatch import Changes
from .nftwatch import end_probation, put_on_probation
from .parts import Parts, open_parts
from .reconcile import Reconciliation, adopt
from .records import Records
from .reresolve import SETTLE_S, Reresolver
from .status import AgentFacts, Counters, build_status
from .sweep import Sweeper, SweepPlan, conntrack_timeouts

log = logging.getLogger(__name__)

HEARTBEAT_FRACTION = 4  # heartbeats per heartbeat timeout
RING_BUDGET = 512  # new-tuple records handled per wake-up
RECHECK_BUDGET = 128  # direct conntrack queries (tens of us each) per ring wake-up
SUMMARY_EVERY_S = 60.0
WARM_FIRST_S, WARM_EVERY_S = 0.05, 0.5  # the resolver's caches refilled (Decider.warm)


class Agent:
    def __init__(self, settings: Settings, parts: Parts, *,
                 load_settings: Callable[[], Settings] | None = None) -> None:
        self.settings = settings
        self.load_settings = load_settings
        self.parts = parts
        self.dp, self.resolver, self.ct, self.net = parts.dp, parts.resolver, parts.ct, parts.net
        self.rec = Records()
        self.attacher = Attacher(self.dp, self.resolver)
        self.state = FlowState(max_waiting=settings.pending_flows, ident=self.rec.wire)
        self.ring = bpfobj.RingBuffer(self.dp.events, self._on_ring_record)
        self.counters = Counters()
        self.table = FlowTable(self.dp, self.counters, self.rec)
        self.sweeper = Sweeper(self.dp.flows, self.ct, self.rec, on_remove=self._swept)
        self.table.handed_back = self.sweeper.hand_back  # conntrack's own timeout goes back
        self._swept_on_probation: list[bytes] = []
        self.timeouts = conntrack_timeouts()
        self.started = time.time()
        self.pid = os.getpid()  # the agent's, also when a forked child builds the status
        self._ring_batch: list[bytes] = []  # raw ring records
        self._last_summary = time.monotonic()
        self.loop = EventLoop()
        self.reconcile = Reconciliation(self.dp.flows, self.rec, self.loop.watch, self.loop.unwatch,
                                        self._on_conntrack_gone, waits=self.state.waits,
                                        found=self.on_ct_events)  # NEW events the overflow lost
        self._overflows_seen = 0
        self.decider = Decider(settings, parts, self.state, self.table, self.counters,
                               self.attacher.hook_of)
        self.decide = self.decider.decide
        self.probation, self.early_drop = self.decider.probation, self.decider.early_drop
        self.reresolver = Reresolver(self.dp, self.rec, self.resolver, self.table, self.probation,
                                     self.decider.path_of, self.net.used,
                                     self.counters.torn_down, self.decider.tc_only)
        self.reresolver.handed_back = self.sweeper.hand_back
        self._reresolve_timer: Timer | None = None
        self._sweep_timer = self.loop.every(lambda: self.settings.sweep_interval, self.sweep,
                                            serves=(self.ring.fd, self.parts.ct_events.fileno()))

    # -- start and stop ---------------------------------------------------------------
    def start(self) -> None:
        self.dp.configure(enabled=True, heartbeat_timeout=self.settings.heartbeat_timeout,
                          early_drop=self.settings.early_drop)
        self.attach()
        adopt(self.dp, self.ct, self.rec)
        log.info("offloading on %s", ", ".join(f"{a.link.name} ({a.hook})" for a in
                                                self.attacher.attached.values()) or "nothing")

    def attach(self) -> None:
        s = self.settings
        # Default: the lan and wan devices of /etc/config/network.
        self.attacher.attach_all(list(s.interfaces) or list(network_devices()), s.hook)
        self.decider.forget_paths()  # hooks (XDP or TC) and exclusions may differ
        self.decider.exclusions = Exclusions(src=s.exclude_src, dst=s.exclude_dst,
                                     ifindexes=self.attacher.zone_devices(s.exclude_zones))

    def shutdown(self) -> None:
        """Stop offloading: the datapath passes everything, programs detach."""
        try:
            self.dp.configure(enabled=False)
        except OffloadError as exc:
            log.warning("disabling the datapath: %s", exc)
        try:  # the kernel has them all now: conntrack's own timeouts go back
            self.sweeper.hand_back_all(self.timeouts, delete=False)
        except (OffloadError, OSError) as exc:
            log.warning("putting conntrack timeouts back: %s", exc)
        self.attacher.detach_all()
        self.ring.close()

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> None:
        loop = self.loop
        # Ring first: a tuple is noted as waiting before the conntrack
        # event that makes it offloadable is read (handlers run in order).
        loop.watch(self.ring.fd, self._on_ring)
        loop.watch(self.parts.ct_events.fileno(), self._on_ct_readable)
        loop.watch(self.parts.ct_events.destroy_fileno(),
                   lambda: self._on_ct_readable(destroys=True))
        loop.watch(self.net.fileno(), lambda: self.apply(self.net.read()))
        loop.watch(self.parts.nft.fileno(), self._on_ruleset)
        loop.watch(self.parts.control.fileno(), self.parts.control.serve_one)
        # A busy source (a flood) must not make a live agent look dead to
        # the datapath: the heartbeat is urgent, it beats between handlers.
        loop.every(lambda: self.settings.heartbeat_timeout / HEARTBEAT_FRACTION,
                   self.dp.heartbeat, first_in=0.0, urgent=True)
        self.sweeper.serve_with(loop.serve_ready)  # new flows meanwhile
        loop.every(lambda: WARM_EVERY_S, lambda: self.decider.warm(self.attacher.attached),
                   first_in=WARM_FIRST_S)
        # A slice of the re-resolve pass each round of the loop while one is
        # wanted, the other sources served in between.
        self._reresolve_timer = loop.every(self.reresolver.interval, self.reresolver.step)
        loop.on_signal(signal.SIGHUP, self.reload)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.on_signal(sig, loop.stop)
        settle(loop.every)  # start-up's objects frozen, the freed heap given back
        try:
            loop.run()
        finally:
            self.reconcile.stop()

    def reload(self) -> None:
        """SIGHUP: re-read the configuration (file, then the command line's
        overrides) and re-attach; offloaded flows that are still allowed stay."""
        try:
            new = self.load_settings() if self.load_settings else self.settings
        except OffloadError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        try:
            self.parts.control.set_group(new.control_group or None)
        except OffloadError as exc:
            log.error("control_group: %s", exc)
        if new.hook != self.settings.hook:
            self.attacher.detach_all()
        rejudge = redecide_needed(self.settings, new)
        self.settings = self.decider.settings = new
        self.resolver.forget(links=True, routes=True)
        try:
            self.attach()
        except OffloadError as exc:
            log.error("re-attach after reload: %s", exc)
        self.dp.configure(enabled=True, heartbeat_timeout=new.heartbeat_timeout,
                          early_drop=new.early_drop)
        if rejudge:  # what may be offloaded changed: every flow is decided again
            self.flush(Teardown.CONFIG)
        log.info("configuration reloaded")

    # -- new tuples ---------------------------------------------------------------------
    def _on_ring_record(self, data: bytes) -> None:
        self._ring_batch.append(bytes(data[: self.rec.e_stamp + 8]))

    def _on_ring(self) -> None:
        # Bounded: under a flood of new tuples the rest waits in the ring (or
        # is dropped there, counted as event_drop) while the loop goes round.
        self.ring.consume(RING_BUDGET)
        batch, self._ring_batch = self._ring_batch, []
        now = time.monotonic_ns()
        asks = RECHECK_BUDGET
        ks, ts = self.rec.key_size, self.rec.e_stamp
        for record in batch:
            self.counters.events += 1
            key = record[:ks]
            stamp = int.from_bytes(record[ts:], "little")
            seen, recent = self.state.seen(key, now, stamp)
            if seen is Seen.NEW:
                self.decider.noted(key, stamp)
                if recent is not None:
                    # Conntrack's event for this connection was read before
                    # the ring record arrived: decide with it now.
                    guarded(self.decider.decide_with, key, recent)
            elif seen is Seen.RECHECK and asks > 0:
                # Seen again and still undecided: conntrack events did not
                # settle it (agent restarted, event lost): ask directly. At
                # most RECHECK_BUDGET such queries per wake-up; the others
                # are announced again, or found stuck by the sweep.
                asks -= 1
                guarded(self.decide, key)
        self.dp.settle_pending()

    def _on_ct_readable(self, destroys: bool = False) -> None:
        """NEW and UPDATE events; with ``destroys``, DESTROY events after
        the NEW and UPDATE events still queued (CtEvents.read_destroys)."""
        events = self.parts.ct_events
        self.on_ct_events(events.read_destroys() if destroys else events.read())
        self.dp.settle_pending()
        if events.overflows != self._overflows_seen:
            self._overflows_seen = events.overflows
            self.reconcile.wanted()

    def _on_conntrack_gone(self, raw_keys: list[bytes]) -> None:
        """A reconcile found flows whose conntrack entry is gone."""
        self.table.forget(raw_keys)
        self.counters.torn_down[Teardown.CT_GONE] += self.dp.flows.delete_batch(raw_keys)
        self.counters.reconciles += 1

    def on_ct_events(self, events: Iterable[Any]) -> None:
        for ev in events:
            if ev.kind == "destroy":
                if self.state.forget(ev.orig_id, ev.reply_id):
                    self._sweep_timer.hurry(0.0)  # a flood of destroys: bounded memory
                continue
            entry: CtEntry = ev.entry
            orig, reply = ev.orig_id, ev.reply_id
            if closing(entry):
                # Also catches a flow offloaded from an older event after its
                # FIN had already gone through.
                self.state.closing(orig, reply)
                continue
            for key, is_reply in self.state.updated(entry, orig, reply, new=ev.kind == "new"):
                guarded(self.decide, key, (entry, is_reply))

    # -- the sweep -----------------------------------------------------------------------
    def sweep(self) -> None:
        """The safety net: hand back FIN/RST/SYN flows, idle and destroyed ones,
        refresh conntrack for flows that carried traffic, pick up pending
        tuples whose ring event was lost."""
        s = self.settings
        result = self.sweeper.run(SweepPlan.at(
            time.monotonic_ns(), self.sweeper.passes + 1, tcp_idle_s=s.tcp_timeout,
            udp_idle_s=s.udp_timeout, timeouts=self.timeouts, interval_s=s.sweep_interval,
            dead=self.state.take_dead(), hybrid=self.attacher.hybrid(),
            marks=self.state.take_marks()))
        self.counters.torn_down.update(result.reasons)
        self.table.evictable = result.pass_keys
        self.reconcile.tick()
        if self.probation:
            removed, self._swept_on_probation = self._swept_on_probation, []
            self._end_probation(removed)
        # The pending map's read and the set arithmetic over it are a
        # stretch of their own: new flows that came during the pass first.
        self.loop.serve_ready()
        now = time.monotonic_ns()
        for key in self.state.sync_pending(self.dp.pending_keys(), now):
            guarded(self.decide, key)
        self.dp.settle_pending()
        if time.monotonic() - self._last_summary >= SUMMARY_EVERY_S:
            self._last_summary = time.monotonic()
            log.info("%s, conntrack refreshes %d", self.counters.summary(), self.sweeper.refreshed)

    # -- ruleset changes -----------------------------------------------------------------
    def _on_ruleset(self) -> None:
        if self.parts.nft.read():
            n = self.rejudge(Teardown.RULESET)
            log.info("ruleset changed: drops forgotten, %d flows handed back on probation", n)

    def rejudge(self, reason: Teardown) -> int:
        """Forget every drop and hand every offloaded flow back, so that the
        ruleset as it is now judges their next packets; each stays with the
        kernel until the egress probe sees the kernel forward it after now."""
        self.decider.learn_ruleset()
        self.decider.forget_paths()  # a packet mark the ruleset sets may route otherwise
        self.early_drop.forget()
        self.sweeper.hand_back(self.dp.flows.items())  # passed: held, then put back
        n = put_on_probation(self.dp, self.probation, self.rec.state_offload)
        self.counters.torn_down[reason] += n
        return n

    def _swept(self, raw_keys: list[bytes]) -> None:
        """Entries the sweep removed: their pass reasons go; those on
        probation leave it after the sweep (SweepResult keeps no removals)."""
        self.table.forget(raw_keys)
        if self.probation:
            self._swept_on_probation += [k for k in raw_keys if self.probation.holds(k)]

    def _end_probation(self, removed: list[bytes]) -> None:
        """Flows gone from the map leave probation; proven ones are offloaded again."""
        for raw_key in end_probation(self.dp, self.probation, removed):
            self.state.decided(raw_key, time.monotonic_ns())
            guarded(self._reoffload, raw_key)

    def _reoffload(self, raw: bytes) -> None:
        if self.decide(raw) is Decision.OFFLOAD:
            self.counters.reoffloaded += 1

    # -- network changes ----------------------------------------------------------------
    def apply(self, changes: Changes) -> None:
        """Resolve again what a network change could re-route; hand back
        every flow after a link change, the flows to a MAC that changed."""
        if changes.paths_moved:  # not for a neighbour that only aged (REACHABLE -> STALE)
            self.decider.forget_paths()
        for index in changes.links_gone:
            self.attacher.gone(index)
            self.dp.forget_tx_ports()  # the kernel dropped its devmap entry
        if changes.flush_all:
            self.early_drop.forget()
            n = self.flush(Teardown.NETWORK)
            log.debug("link change: %d flows handed back", n)
            return
        if changes.reresolve:
            self.early_drop.forget()  # a route drop or an unreachable one may be gone
            self.reresolver.changed(changes.reresolve)
            if self._reresolve_timer is not None:
                self._reresolve_timer.hurry(SETTLE_S)  # a burst of changes: one pass
        for mac, reason in changes.macs.items():
            self.flush_where_dmac(mac, reason)

    # -- handing flows back --------------------------------------------------------------

    def flush_where_dmac(self, mac: bytes, reason: Teardown) -> int:
        n = self.table.remove_where_dmac(mac)
        self.counters.torn_down[reason] += n
        return n

    def flush(self, reason: Teardown) -> int:
        """Hand every flow back to the kernel; they are decided afresh (flows
        on probation stay there)."""
        n = self.sweeper.hand_back_all(self.timeouts) + self.table.clear()
        self.state.clear_waiting()
        self.net.forget_nexthops()
        self.dp.forget_tx_ports()
        self.counters.torn_down[reason] += n
        return n

    # -- control requests ----------------------------------------------------------------
    def handle_request(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            return self.status(limit=int(req.get("limit") or 0))
        if cmd == "flush":  # fw4's include: what the ruleset event did already, harmless twice
            return {"flushed": self.rejudge(Teardown.FLUSH_COMMAND)}
        raise OffloadError(f"unknown command {cmd!r}")

    def status(self, limit: int = 0) -> dict[str, Any]:
        agent = self.counters.report()
        agent.update(self.early_drop.counts.report())
        agent.update(self.reresolver.report())
        agent.update(ruleset_changes=self.parts.nft.changes, on_probation=len(self.probation),
                     conntrack_refreshes=self.sweeper.refreshed, young_renewed=self.sweeper.settled,
                     handed_to_tc=self.sweeper.to_tc, qdisc_changes=self.net.queueing_changes,
                     conntrack_update_failures=self.ct.update_failures,
                     conntrack_event_overflows=self.parts.ct_events.overflows)
        facts = AgentFacts(self.pid, self.started, self.attacher.report(), agent,
                           self.decider.latencies.percentiles(), why=self.table.why)
        out = build_status(self.dp, facts, self.attacher.name_of, limit)
        out["shapers"] = self._shapers()
        return out

    def _shapers(self) -> list[dict[str, str]]:
        """The qdiscs of somebody's the agent saw (as last read: no netlink
        query here, a forked child answers), for ``status``: an offloaded
        flow that meets one is forwarded by TC or left to the kernel under
        hook hybrid and auto, and goes past it under xdp."""
        q = self.resolver.cached_queueing()
        if q is None:
            return []

        def name(index: int) -> str:
            return q.names.get(index) or self.attacher.name_of(index)

        return ([{"device": name(i), "qdisc": kind} for i, kind in sorted(q.shapers.items())]
                + [{"device": name(i), "qdisc": "ingress"} for i in sorted(q.ingress)])


def run_agent(settings: Settings, *, load_settings: Callable[[], Settings] | None = None,
              on_ready: Callable[[Agent], None] | None = None) -> None:
    agents: list[Agent] = []

    def handler(req: dict[str, Any]) -> dict[str, Any]:
        if not agents:
            raise OffloadError("the agent is starting")
        return agents[0].handle_request(req)

    with contextlib.ExitStack() as stack:
        parts = open_parts(stack, settings, handler)
        agent = Agent(settings, parts, load_settings=load_settings)
        agents.append(agent)
        started = False
        try:
            agent.start()
            started = parts.pins.keep = True
            if on_ready:
                on_ready(agent)
            agent.run()
        finally:
            attached = bool(agent.attacher.attached)
            agent.shutdown()
            if started or attached:  # a refused start says only why
                log.info("stopped; programs detached")
