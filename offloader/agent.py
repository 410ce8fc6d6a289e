"""The agent: one event loop that decides, offloads and tears down flows.

Inputs, all on one selector, no threads:
  ring buffer      a tuple the datapath has not seen before (or still pending)
  conntrack events NEW/UPDATE (a waiting tuple may now be offloadable),
                   DESTROY (its flows must go)
  rtnetlink events route, rule, address, link, neighbour, FDB changes
  control socket   status and flush requests
  signals          SIGTERM/SIGINT stop, SIGHUP reloads the configuration
  timers           heartbeat (the datapath's fail-safe), sweep

The flow table lives in the BPF maps; Python keeps only the tuples waiting
for a decision (bounded by the pending map's size), the conntrack zones seen
in events, and the next hops in use.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import time
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from . import bpfobj, ctnetlink
from .config import Settings
from .conntrack import (
    IPS_ASSURED,
    Conntrack,
    CtEntry,
    CtEvents,
    Tuple5,
    nat_target,
    offloadable,
    raw_wire_id,
    wire_id,
)
from .control import ControlServer
from .datapath import Datapath, FlowKey, Verdict, find_object, netns_pin_dir
from .errors import AttachError, OffloadError, ResolveError
from .layout import layout
from .routing import (
    NUD_VALID,
    RTM_DELLINK,
    RTM_DELNEIGH,
    RTM_DELROUTE,
    RTM_F_CLONED,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
    Link,
    NotYet,
    Resolver,
    attach_points,
    rt_event_socket,
)

log = logging.getLogger(__name__)

AF_BRIDGE = 7
TCP_FIN_WAIT, TCP_CLOSE = 4, 8  # conntrack TCP states FIN_WAIT .. CLOSE: closing
HEARTBEAT_FRACTION = 4  # heartbeats per heartbeat timeout
RECHECK_AFTER_NS = 150_000_000
RECENT_CT = 1024  # conntrack entries remembered from events
LATENCY_SAMPLES = 20_000  # setup latencies kept for status
DEAD_BEFORE_SWEEP = 8192  # destroyed tuples noted before an early sweep
STUCK_AFTER_NS = 500_000_000  # the sweep asks conntrack about tuples waiting longer
STUCK_BUDGET = 256  # at most this many such queries per sweep  # a waiting tuple seen again after this: ask conntrack
SUMMARY_EVERY_S = 60.0


def tuple_id(t: Tuple5) -> bytes:
    return wire_id(t.proto, t.sport, t.dport, t.src.packed, t.dst.packed)


def key_tuple(key: FlowKey) -> Tuple5:
    return Tuple5(key.proto, key.src, key.dst, key.sport, key.dport)


class _Offsets:
    """Byte offsets into raw map keys/values, from the header (fast sweep)."""

    def __init__(self) -> None:
        ffi = layout().ffi
        self.k_proto = ffi.offsetof("struct ofl_key", "proto")
        self.k_family = ffi.offsetof("struct ofl_key", "family")
        self.k_sport = ffi.offsetof("struct ofl_key", "sport")
        self.k_saddr = ffi.offsetof("struct ofl_key", "saddr")
        self.k_daddr = ffi.offsetof("struct ofl_key", "daddr")
        self.f_last = ffi.offsetof("struct ofl_flow", "last_seen_ns")
        self.f_state = ffi.offsetof("struct ofl_flow", "state")
        self.f_seen = ffi.offsetof("struct ofl_flow", "seen")
        self.v_dmac = ffi.offsetof("struct ofl_verdict", "dmac")
        self.v_flags = ffi.offsetof("struct ofl_verdict", "flags")
        self.v_zone = ffi.offsetof("struct ofl_verdict", "ct_zone")
        self.key_size = ffi.sizeof("struct ofl_key")
        # (proto, sport, dport) of a key; (verdict flags, conntrack zone,
        # last seen, state, seen flags) of a flow: formats built from the
        # header's offsets, so they follow any change of the layout.
        self.key_fields = _fields(self.key_size, [(self.k_proto, "B"), (self.k_sport, "!H"),
                                                  (self.k_sport + 2, "!H")])
        self.flow_fields = _fields(ffi.sizeof("struct ofl_flow"), [
            (self.v_flags, "B"), (self.v_zone, "H"), (self.f_last, "Q"), (self.f_state, "I"),
            (self.f_seen, "I")])

    def raw5(self, raw_key: bytes) -> ctnetlink.Raw5:
        """(proto, src, dst, sport, dport) straight from key bytes, addresses
        packed (4 or 16 bytes): what the ctnetlink encoder takes."""
        sport, dport = struct.unpack_from("!HH", raw_key, self.k_sport)
        n = 4 if raw_key[self.k_family] == socket.AF_INET else 16
        return (raw_key[self.k_proto], raw_key[self.k_saddr : self.k_saddr + n],
                raw_key[self.k_daddr : self.k_daddr + n], sport, dport)

    def wire(self, raw_key: bytes) -> bytes:
        return raw_wire_id(self.raw5(raw_key))


def _fields(size: int, fields: list[tuple[int, str]]) -> struct.Struct:
    """A struct.Struct reading ``fields`` ((offset, code), ascending) of a
    ``size``-byte record, host byte order, padding skipped. A code with a
    leading "!" is big-endian: read as host order and swapped by the caller
    only where it matters (ports are only hashed here)."""
    fmt, pos = "=", 0
    for offset, code in fields:
        code = code.lstrip("!")
        fmt += f"{offset - pos}x{code}" if offset > pos else code
        pos = offset + struct.calcsize("=" + code)
    fmt += f"{size - pos}x" if size > pos else ""
    return struct.Struct(fmt)


@dataclass
class Attached:
    link: Link
    hook: str  # xdp, xdpgeneric, tc
    restore: tuple[str, ...] = ()  # device features we turned off, to turn back on


@dataclass
class Counters:
    offloaded: int = 0
    passed: int = 0
    torn_down: dict[str, int] = field(default_factory=dict)
    refreshed: int = 0
    events: int = 0

    def teardown(self, reason: str, n: int = 1) -> None:
        self.torn_down[reason] = self.torn_down.get(reason, 0) + n


class Agent:
    def __init__(self, settings: Settings, *, interfaces: list[str], hook: str = "auto",
                 object_path: str = "", pin: bool = True) -> None:
        self.settings = settings
        self.interfaces = interfaces
        self.hook = hook
        self.started = time.time()
        self.pid = os.getpid()
        self.off = _Offsets()
        self.consts = layout().consts
        pin_dir = netns_pin_dir() if pin else None
        self.dp = Datapath(find_object(object_path or settings.object),
                           max_flows=settings.max_flows, pending_flows=settings.pending_flows,
                           pin_dir=pin_dir)
        self.resolver = Resolver(IPRoute())
        self.ct = Conntrack()
        self.ct_events = CtEvents()
        self.rt_events = rt_event_socket()
        self._rt_parser = IPRoute()
        self.control = ControlServer(self.handle_request, fork_for={"status"})
        self.ring = bpfobj.RingBuffer(self.dp.events, self._on_ring_event)
        self.attached: dict[int, Attached] = {}
        # wire tuple id -> {key: when it was first seen waiting}
        self.waiting: dict[bytes, dict[FlowKey, int]] = {}
        self.zones: dict[bytes, int] = {}  # wire tuple id -> conntrack zone, from events
        self.dead: set[bytes] = set()  # wire tuple ids conntrack destroyed
        # Connections handed back by `flush` (a firewall reload): the kernel
        # keeps them until they end, since only its rules may judge them now.
        self.held: set[bytes] = set()
        # The last conntrack NEW/UPDATE entries by tuple (insertion ordered,
        # bounded): closes the race where an event is read before the ring
        # record of its first packet.
        self.recent_ct: dict[bytes, CtEntry] = {}
        self.nexthops: dict[tuple[int, Any], bytes] = {}  # (l3 oif, hop) -> MAC in use
        self.counters = Counters()
        # First packet to offloaded, ms: the last LATENCY_SAMPLES as 4-byte floats.
        self.latencies = array("f")
        self._latency_next = 0
        self.stop = False
        self.reload_requested = False
        self.sweeps = 0
        self._ring_batch: list[FlowKey] = []
        self._excluded_ifindexes: set[int] = set()
        self._ct_timeouts = _ct_timeouts()
        self._last_summary = time.monotonic()

    # -- setup and teardown -------------------------------------------------------
    def start(self) -> None:
        self.dp.configure(enabled=True, heartbeat_timeout=self.settings.heartbeat_timeout)
        self.attach_all()
        self._adopt()
        log.info("offloading on %s", ", ".join(f"{a.link.name} ({a.hook})"
                                                for a in self.attached.values()) or "nothing")

    def attach_all(self) -> None:
        names = list(self.interfaces or self.settings.interfaces)
        if not names:
            from .config import network_devices

            names = list(network_devices())  # the lan and wan of /etc/config/network
        if not names:
            raise OffloadError("no interfaces to offload on: give -i IFACE, set "
                               "`list interfaces` in the configuration, or define lan and wan "
                               "in /etc/config/network")
        # TC attaches above VLAN, PPPoE and DSA (the kernel decapsulates, and
        # redirecting into those devices keeps their qdiscs, i.e. SQM);
        # XDP and auto attach to the lowest devices.
        points = attach_points(self.resolver, names, full=self.hook != "tc")
        wanted = {p.link.index: p for p in points}
        for index in list(self.attached):
            if index not in wanted:
                self._detach(index)
        for index, point in wanted.items():
            if point.dsa_proto or point.l3:
                self.dp.set_iface(index, point.dsa_proto, l3=point.l3)
            if index not in self.attached:
                self.attached[index] = self._attach(point.link)
                self.dp.add_tx_port(index)
        self._excluded_ifindexes = self._zone_devices()

    def _attach(self, link: Link) -> Attached:
        if self.hook == "tc":
            bpfobj.tc_attach(link.index, self.dp.tc)
            return Attached(link, "tc")
        restore = self._show_vlan_tags_to_xdp(link)
        if self.hook in ("xdp", "xdpgeneric"):
            return Attached(link, bpfobj.xdp_attach(link.index, self.dp.xdp, self.hook), restore)
        try:  # auto: native XDP where the driver has it, else TC (faster than generic XDP)
            return Attached(link, bpfobj.xdp_attach(link.index, self.dp.xdp, "xdp"), restore)
        except AttachError as exc:
            log.info("%s: no native XDP (%s), using TC", link.name, exc)
            _set_features(link.name, restore, True)
            bpfobj.tc_attach(link.index, self.dp.tc)
            return Attached(link, "tc")

    def _show_vlan_tags_to_xdp(self, link: Link) -> tuple[str, ...]:
        """A device that strips VLAN tags on receive (rx-vlan-hw-parse) hands
        XDP the frame without its tag, which would key a VLAN's flows as the
        lower device's. Where VLAN devices sit on top, or the device is a port
        of a VLAN-filtering bridge, turn that off while we are attached
        (restored on detach); the kernel then parses the tag in software, as
        it does for any device without the offload."""
        master = self.resolver.link(link.master) if link.master else None
        vlan_port = master is not None and master.vlan_filtering
        if not vlan_port and not any(d.kind == "vlan" and d.link == link.index
                                     for d in self.resolver.links()):
            return ()
        names = ("rx-vlan-hw-parse", "rx-vlan-stag-hw-parse")
        changed = _set_features(link.name, names, False)
        if changed:
            log.info("%s: VLAN tag stripping off while XDP is attached (%s)", link.name,
                     ", ".join(changed))
        return changed

    def _detach(self, index: int) -> None:
        att = self.attached.pop(index)
        try:
            if att.hook == "tc":
                bpfobj.tc_detach(index)
            else:
                bpfobj.xdp_detach(index, att.hook)
        except AttachError as exc:
            log.warning("detaching from %s: %s", att.link.name, exc)
        _set_features(att.link.name, att.restore, True)

    def _adopt(self) -> None:
        """Keep what a previous run offloaded if conntrack still has it."""
        stale = []
        adopted = 0
        for entry in self.dp.flow_entries():
            found = self.ct.get(key_tuple(entry.key), self._zone_of(entry.raw))
            if found is None:
                stale.append(entry.key)
            else:
                adopted += 1
                if entry.state == self.consts["OFL_STATE_OFFLOAD"]:
                    self.dp.add_tx_port(entry.oif)
        if stale:
            self.dp.remove(stale)
        if adopted or stale:
            log.info("adopted %d flows from a previous run, dropped %d stale", adopted, len(stale))

    def shutdown(self) -> None:
        """Stop offloading: the datapath passes everything, programs detach."""
        try:
            self.dp.configure(enabled=False)
        except OffloadError as exc:
            log.warning("disabling the datapath: %s", exc)
        for index in list(self.attached):
            self._detach(index)
        self.ring.close()
        self.control.close()
        self.ct_events.close()
        self.rt_events.close()
        self._rt_parser.close()
        self.ct.close()
        self.resolver.close()
        self.dp.close()

    # -- the loop ------------------------------------------------------------------
    def run(self) -> None:
        sel = selectors.DefaultSelector()
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old_fd = signal.set_wakeup_fd(wake_w.fileno())
        handlers = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        sel.register(self.ring.fd, selectors.EVENT_READ, "ring")
        sel.register(self.ct_events, selectors.EVENT_READ, "ct")
        sel.register(self.rt_events, selectors.EVENT_READ, "rt")
        sel.register(self.control, selectors.EVENT_READ, "control")
        sel.register(wake_r, selectors.EVENT_READ, "signal")
        heartbeat_every = self.settings.heartbeat_timeout / HEARTBEAT_FRACTION
        next_heartbeat = 0.0
        next_sweep = time.monotonic() + self.settings.sweep_interval
        try:
            while not self.stop:
                now = time.monotonic()
                if now >= next_heartbeat:
                    self.dp.heartbeat()
                    next_heartbeat = now + heartbeat_every
                if now >= next_sweep:
                    self.sweep()
                    next_sweep = now + self.settings.sweep_interval
                timeout = max(0.0, min(next_heartbeat, next_sweep) - time.monotonic())
                ready = {key.data for key, _ in sel.select(timeout)}
                # Ring first: a tuple is noted as waiting before the conntrack
                # event that makes it offloadable is read.
                if "ring" in ready:
                    self.ring.consume()
                    self._drain_ring()
                if "ct" in ready:
                    self.on_ct_events(self.ct_events.read())
                if "rt" in ready:
                    self.on_rt_events()
                if "control" in ready:
                    self.control.serve_one()
                if "signal" in ready:
                    try:
                        wake_r.recv(64)
                    except BlockingIOError:
                        pass
                if self.reload_requested:
                    self.reload_requested = False
                    self.reload()
        finally:
            signal.set_wakeup_fd(old_fd)
            for sig, h in handlers.items():
                signal.signal(sig, h)
            sel.close()
            wake_r.close()
            wake_w.close()

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            self.reload_requested = True
        else:
            self.stop = True

    def reload(self) -> None:
        """SIGHUP: re-read the configuration (file, then the command line's
        overrides) and re-attach; offloaded flows that are still allowed stay."""
        try:
            new = self.load_settings() if self.load_settings else self.settings
        except OffloadError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        if new.hook != self.hook:
            for index in list(self.attached):
                self._detach(index)
        decisive = ("exclude_src", "exclude_dst", "exclude_zones", "offload_udp")
        rejudge = any(getattr(new, f) != getattr(self.settings, f) for f in decisive)
        self.settings = new
        self.hook = new.hook
        self.interfaces = list(new.interfaces)
        self.resolver.forget(links=True, routes=True)
        try:
            self.attach_all()
        except OffloadError as exc:
            log.error("re-attach after reload: %s", exc)
        self.dp.configure(enabled=True, heartbeat_timeout=new.heartbeat_timeout)
        if rejudge:  # what may be offloaded changed: every flow is decided again
            self.flush("configuration change")
        log.info("configuration reloaded")

    load_settings: Callable[[], Settings] | None = None

    # -- new tuples -------------------------------------------------------------------
    def _on_ring_event(self, data: bytes) -> None:
        self._ring_batch.append(FlowKey.unpack(data[: layout().sizeof("struct ofl_key")]))

    def _drain_ring(self) -> None:
        batch, self._ring_batch = self._ring_batch, []
        now = time.monotonic_ns()
        for key in batch:
            self.counters.events += 1
            tid = tuple_id(key_tuple(key))
            keys = self.waiting.setdefault(tid, {})
            since = keys.get(key)
            if since is None:
                keys[key] = now
                if len(self.waiting) > self.settings.pending_flows:
                    self.waiting.pop(next(iter(self.waiting)))
                recent = self.recent_ct.get(tid)
                if recent is not None:
                    # Conntrack's event for this connection was read before
                    # the ring record arrived: decide with it now.
                    self.decide(key, (recent, recent.orig != key_tuple(key)))
            elif now - since >= RECHECK_AFTER_NS:
                # Seen again and still undecided: conntrack events did not
                # settle it (agent restarted, event lost): ask directly.
                keys[key] = now
                self.decide(key)

    def on_ct_events(self, events: Iterable[Any]) -> None:
        for ev in events:
            if ev.kind == "destroy":
                orig, reply = ev.orig_id, ev.reply_id
                self.zones.pop(orig, None)
                self.zones.pop(reply, None)
                self.dead.add(orig)
                self.dead.add(reply)
                self.held.discard(orig)
                self.held.discard(reply)
                self.recent_ct.pop(orig, None)
                self.recent_ct.pop(reply, None)
                self.waiting.pop(orig, None)
                self.waiting.pop(reply, None)
                if len(self.dead) > DEAD_BEFORE_SWEEP:
                    self.sweep()  # a flood of destroys: settle them now, bounded memory
                continue
            entry: CtEntry = ev.entry
            orig, reply = tuple_id(entry.orig), tuple_id(entry.reply)
            if entry.orig.proto == socket.IPPROTO_TCP and TCP_FIN_WAIT <= entry.tcp_state <= TCP_CLOSE:
                # Closing (FIN_WAIT .. CLOSE): the kernel must see the rest.
                # Also catches a flow offloaded from an older event after its
                # FIN had already gone through.
                self.dead.add(orig)
                self.dead.add(reply)
                self.waiting.pop(orig, None)
                self.waiting.pop(reply, None)
                continue
            if entry.zone:
                self.zones[orig] = self.zones[reply] = entry.zone
            self.recent_ct[orig] = self.recent_ct[reply] = entry
            while len(self.recent_ct) > RECENT_CT:
                self.recent_ct.pop(next(iter(self.recent_ct)))
            for tid, is_reply in ((orig, False), (reply, True)):
                for key in list(self.waiting.get(tid, {})):
                    self.decide(key, (entry, is_reply))

    def _zone_of(self, raw_value: bytes) -> int:
        return int.from_bytes(raw_value[self.off.v_zone : self.off.v_zone + 2], "little")

    def _excluded(self, key: FlowKey, dst_after_nat: Any, oif: int) -> bool:
        s = self.settings
        if any(key.src in net for net in s.exclude_src if net.version == key.src.version):
            return True
        if any(dst_after_nat in net for net in s.exclude_dst if net.version == key.dst.version):
            return True
        return key.ifindex in self._excluded_ifindexes or oif in self._excluded_ifindexes

    def decide(self, key: FlowKey, found: tuple[CtEntry, bool] | None = None) -> str:
        """Offload ``key``, pass it for good, or leave it waiting; returns which."""
        t = key_tuple(key)
        tid = tuple_id(t)
        if found is None:
            found = self.ct.get(t, self.zones.get(tid, 0))
            if found is None:
                return "wait"
        entry, is_reply = found
        if tid in self.held:
            return self._pass(key, tid, "handed back by flush")
        why = offloadable(entry, offload_udp=self.settings.offload_udp)
        if why == "wait":
            return "wait"
        if why:
            return self._pass(key, tid, why)
        target = nat_target(entry, is_reply)
        ingress = self.attached.get(key.ifindex)
        full = ingress is None or ingress.hook != "tc"  # TC may redirect into upper devices
        try:
            path = self.resolver.resolve(key, target.dst, full=full)
        except NotYet as exc:
            log.debug("%s: %s, retrying", _fmt(key), exc)
            return "wait"
        except ResolveError as exc:
            return self._pass(key, tid, str(exc))
        if self._excluded(key, target.dst, path.l3_oif):
            return self._pass(key, tid, "excluded by configuration")
        if key.proto == socket.IPPROTO_TCP and not self.ct.set_liberal(t, is_reply, entry.zone):
            return "wait"  # the entry went away meanwhile
        verdict = Verdict(oif=path.oif, l2=path.l2, mtu=path.mtu, key=key,
                          nat_src=target.src, nat_dst=target.dst, nat_sport=target.sport,
                          nat_dport=target.dport, reply=is_reply, zone=entry.zone,
                          assured=bool(entry.status & IPS_ASSURED))
        first_seen = self.dp.pending_first_seen(key)
        self.dp.offload(key, verdict)
        if first_seen:
            self._note_latency((time.monotonic_ns() - first_seen) / 1e6)
        self.nexthops[(path.l3_oif, path.nexthop)] = path.l2.dmac
        self._unwait(tid, key)
        self.counters.offloaded += 1
        log.debug("offload %s -> ifindex %d", _fmt(key), path.oif)
        return "offload"

    def _note_latency(self, ms: float) -> None:
        if len(self.latencies) < LATENCY_SAMPLES:
            self.latencies.append(ms)
        else:  # a ring: overwrite the oldest
            self.latencies[self._latency_next] = ms
            self._latency_next = (self._latency_next + 1) % LATENCY_SAMPLES

    def _pass(self, key: FlowKey, tid: bytes, why: str) -> str:
        self.dp.mark_pass(key)
        self._unwait(tid, key)
        self.counters.passed += 1
        log.debug("pass %s: %s", _fmt(key), why)
        return "pass"

    def _unwait(self, tid: bytes, key: FlowKey) -> None:
        keys = self.waiting.get(tid)
        if keys is not None:
            keys.pop(key, None)
            if not keys:
                del self.waiting[tid]

    # -- the sweep ----------------------------------------------------------------------
    def sweep(self) -> None:
        """The safety net: hand back FIN/RST/SYN flows, idle and destroyed ones,
        refresh conntrack for flows that carried traffic, pick up pending
        tuples whose ring event was lost."""
        self.sweeps += 1
        off = self.off
        s = self.settings
        now_ns = time.monotonic_ns()
        offload_state = self.consts["OFL_STATE_OFFLOAD"]
        reply_flag = self.consts["OFL_V_REPLY"]
        tcp_idle = s.tcp_timeout * 1_000_000_000
        udp_idle = s.udp_timeout * 1_000_000_000
        assured_flag = self.consts["OFL_V_ASSURED"]
        # Each flow's conntrack timeout is renewed once per period, a third of
        # the timeout the kernel itself would set for it (TCP established,
        # UDP assured or not), spread over the sweeps by a hash of its ports.
        classes = self._refresh_classes()
        slices = {c: max(1, int(p / s.sweep_interval)) for c, (_t, p) in classes.items()}
        remove: list[bytes] = []
        refresh: list[tuple[bytes, int, int]] = []  # key, verdict flags, zone
        reasons: dict[str, int] = {}
        ks = off.key_size
        dead = self.dead
        # Ports as the key struct reads them (host order of network bytes).
        dead_ports = {(w[0], int.from_bytes(w[1:3], sys.byteorder),
                       int.from_bytes(w[3:5], sys.byteorder)) for w in dead}
        tcp = socket.IPPROTO_TCP
        for kb, vb, _n in self.dp.flows.batches():
            # Fields by struct.iter_unpack over the whole batch: the per-flow
            # work in Python is a handful of comparisons.
            for i, ((proto, sport, dport), (flags, zone, last, state, seen)) in enumerate(
                    zip(off.key_fields.iter_unpack(kb), off.flow_fields.iter_unpack(vb),
                        strict=True)):
                reason = ""
                if seen:
                    reason = "tcp-flags"
                elif last and now_ns - last > (tcp_idle if proto == tcp else udp_idle):
                    reason = "idle"
                elif dead_ports and (proto, sport, dport) in dead_ports and \
                        off.wire(kb[i * ks : (i + 1) * ks]) in dead:
                    reason = "conntrack-destroyed"
                if reason:
                    remove.append(kb[i * ks : (i + 1) * ks])
                    reasons[reason] = reasons.get(reason, 0) + 1
                    continue
                if state != offload_state or not last:
                    continue
                cls = "tcp" if proto == tcp else ("udp" if flags & assured_flag else "udp-new")
                n_slices = slices[cls]
                if (now_ns - last < classes[cls][1] * 1_000_000_000
                        and (sport ^ dport) % n_slices == self.sweeps % n_slices):
                    refresh.append((kb[i * ks : (i + 1) * ks], flags, zone))
        if remove:
            self.dp.flows.delete_batch(remove)
            for reason, n in reasons.items():
                self.counters.teardown(reason, n)
        self.dead.clear()
        items: list[tuple[Tuple5 | ctnetlink.Raw5, bool, int, int]] = []
        for raw_key, flags, zone in refresh:
            t = off.raw5(raw_key)
            cls = ("tcp" if t[0] == socket.IPPROTO_TCP
                   else ("udp" if flags & assured_flag else "udp-new"))
            items.append((t, bool(flags & reply_flag), zone, classes[cls][0]))
        if items:
            self.counters.refreshed += self.ct.refresh_many(items)
        self._sweep_pending()
        if time.monotonic() - self._last_summary >= SUMMARY_EVERY_S:
            self._last_summary = time.monotonic()
            c = self.counters
            log.info("flows offloaded %d, passed %d, torn down %s, conntrack refreshes %d",
                     c.offloaded, c.passed, c.torn_down or "none", c.refreshed)

    def _refresh_classes(self) -> dict[str, tuple[int, float]]:
        """Timeout class -> (timeout to set, refresh period): the namespace's
        own conntrack timeouts (read, never changed), renewed at a third of
        their length, within [1 s, 60 s]. Unreplied UDP keeps its short
        timeout: the kernel would not have given it more."""
        t = self._ct_timeouts
        return {c: (v, max(1.0, min(60.0, v / 3))) for c, v in
                (("tcp", t["tcp"]), ("udp", t["udp"]), ("udp-new", t["udp-new"]))}

    def _sweep_pending(self) -> None:
        present: set[FlowKey] = set()
        now = time.monotonic_ns()
        for key, _first, _packets, _bytes in self.dp.pending_entries():
            present.add(key)
            tid = tuple_id(key_tuple(key))
            keys = self.waiting.setdefault(tid, {})
            if key not in keys:
                keys[key] = now  # its ring event was lost: wait like the others
        stuck: list[FlowKey] = []
        for tid in list(self.waiting):
            keys = self.waiting[tid]
            for key in [k for k in keys if k not in present]:
                del keys[key]  # evicted from the LRU or decided
            if not keys:
                del self.waiting[tid]
                continue
            stuck.extend(k for k, since in keys.items() if now - since > STUCK_AFTER_NS)
        # The safety net: no event settled these; ask conntrack (bounded).
        for key in stuck[:STUCK_BUDGET]:
            still = self.waiting.get(tuple_id(key_tuple(key)))
            if still is not None and key in still:
                still[key] = now
                self.decide(key)

    # -- network changes --------------------------------------------------------------
    def on_rt_events(self) -> None:
        flush_all = False
        for _ in range(64):
            try:
                data = self.rt_events.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError:
                flush_all = True  # ENOBUFS: we missed changes
                break
            for msg in self._rt_parser.marshal.parse(data):
                kind = msg["header"]["type"]
                if kind in (RTM_NEWLINK, RTM_DELLINK):
                    flush_all |= self._on_link(msg, kind == RTM_DELLINK)
                elif kind in (RTM_NEWNEIGH, RTM_DELNEIGH):
                    self._on_neigh(msg, kind == RTM_DELNEIGH)
                elif kind in (RTM_NEWROUTE, RTM_DELROUTE) and msg["flags"] & RTM_F_CLONED:
                    continue  # a route cache entry (IPv6 creates them on lookups)
                elif _irrelevant(msg):
                    continue
                else:  # routes, rules, addresses
                    self.resolver.forget(routes=True)
                    flush_all = True
                    log.debug("network change: %s", msg.get("event", kind))
        if flush_all:
            n = self.flush("route or link change")
            log.debug("network change: %d flows handed back", n)

    def _on_link(self, msg: Any, deleted: bool) -> bool:
        index = msg["index"]
        cached = self.resolver.cached_link(index)
        if deleted and index in self.attached:
            self.attached.pop(index)
        if cached is None:
            return False
        self.resolver.forget(links=True, routes=True)
        if deleted:
            return True
        fresh = self.resolver.link(index)
        return (fresh.up, fresh.mtu, fresh.mac, fresh.master) != (
            cached.up, cached.mtu, cached.mac, cached.master)

    def _on_neigh(self, msg: Any, deleted: bool) -> None:
        if msg["family"] == AF_BRIDGE:
            mac = msg.get("NDA_LLADDR")
            if mac:
                raw = bytes.fromhex(mac.replace(":", ""))
                port = msg["ifindex"]
                cached = self.resolver.fdb_ports(raw)
                if deleted or any(p != port for p in cached):
                    self.resolver.forget_fdb(raw)
                    self.flush_where_dmac(raw, "fdb change")
            return
        dst = msg.get("NDA_DST")
        if not dst:
            return
        hop = ipaddress.ip_address(dst)
        ck = (msg["ifindex"], hop)
        used = self.nexthops.get(ck)
        self.resolver.forget_neigh(msg["ifindex"], hop)
        if used is None:
            return
        lladdr = msg.get("NDA_LLADDR")
        new = bytes.fromhex(lladdr.replace(":", "")) if lladdr else b""
        bad_state = not (msg["state"] & NUD_VALID)
        if deleted or new != used or bad_state:
            del self.nexthops[ck]
            self.flush_where_dmac(used, "neighbour change")

    def flush_where_dmac(self, mac: bytes, reason: str) -> int:
        off = self.off
        keys = [k for k, v in self.dp.flows.items() if v[off.v_dmac : off.v_dmac + 6] == mac]
        n = self.dp.flows.delete_batch(keys)
        if n:
            self.counters.teardown(reason, n)
        return n

    def flush(self, reason: str = "flush", hold: bool = False) -> int:
        """Hand every flow back to the kernel; they are decided afresh. With
        ``hold`` (the flush command, run on firewall reload) the connections
        that were offloaded stay with the kernel until they end, so that new
        rules apply to them."""
        if hold:
            off = self.off
            self.held.update(off.wire(k) for k in self.dp.flows.all_keys())
        n = self.dp.flows.clear()
        self.dp.pending.clear()
        self.waiting.clear()
        self.nexthops.clear()
        if n:
            self.counters.teardown(reason, n)
        return n

    def _zone_devices(self) -> set[int]:
        if not self.settings.exclude_zones:
            return set()
        from .config import network_devices, zone_networks

        nets = zone_networks(zones=self.settings.exclude_zones)
        out = set()
        for name in network_devices(interfaces=nets):
            try:
                out.add(self.resolver.link_by_name(name).index)
            except ResolveError:
                continue
        return out

    # -- control requests ------------------------------------------------------------
    def handle_request(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            return self.status(limit=int(req.get("limit") or 0))
        if cmd == "flush":
            return {"flushed": self.flush("flush command", hold=True)}
        raise OffloadError(f"unknown command {cmd!r}")

    def status(self, limit: int = 0) -> dict[str, Any]:
        now_ns = time.monotonic_ns()
        names = {a.link.index: a.link.name for a in self.attached.values()}
        offload_state = self.consts["OFL_STATE_OFFLOAD"]
        flows: list[dict[str, Any]] = []
        for e in self.dp.flow_entries():
            row = _flow_row(e.key, "offloaded" if e.state == offload_state else "passed",
                            e.packets, e.nbytes, names)
            row["last_seen_s"] = round((now_ns - e.last_seen_ns) / 1e9, 3) if e.last_seen_ns else None
            if e.state == offload_state:
                row["out_dev"] = names.get(e.oif) or self._name(e.oif)
                row["nat"] = _nat_of(e.raw)
            flows.append(row)
        for key, _first, packets, nbytes in self.dp.pending_entries():
            flows.append(_flow_row(key, "pending", packets, nbytes, names))
        flows.sort(key=lambda r: r["bytes"], reverse=True)
        total = len(flows)
        if limit:
            flows = flows[:limit]
        c = self.counters
        return {
            "running": True,
            "pid": self.pid,  # the agent's, also when a forked child answers
            "started": self.started,
            "uptime_s": round(time.time() - self.started, 1),
            "interfaces": [{"name": a.link.name, "ifindex": a.link.index, "hook": a.hook}
                           for a in self.attached.values()],
            "counts": {
                "offloaded": sum(1 for f in flows if f["state"] == "offloaded"),
                "passed": sum(1 for f in flows if f["state"] == "passed"),
                "pending": sum(1 for f in flows if f["state"] == "pending"),
                "total": total,
            },
            "agent": {"offloaded": c.offloaded, "passed": c.passed, "torn_down": c.torn_down,
                      "conntrack_refreshes": c.refreshed,
                      "conntrack_update_failures": self.ct.update_failures, "ring_events": c.events,
                      "conntrack_event_overflows": self.ct_events.overflows},
            "datapath": self.dp.stats(),
            "setup_latency_ms": _percentiles(self.latencies),
            "pinned": str(self.dp.pin_dir) if self.dp.pin_dir else None,
            "flows": flows,
        }

    def _name(self, index: int) -> str:
        try:
            return self.resolver.link(index).name
        except ResolveError:
            return str(index)


def _irrelevant(msg: Any) -> bool:
    """Route and address events that cannot change a forwarding decision:
    IPv6 link-local and multicast ones, the local table's."""
    if msg.get("RTA_TABLE") == 255:
        return True
    addr = msg.get("RTA_DST") or msg.get("IFA_ADDRESS")
    if addr and ":" in addr:
        ip = ipaddress.ip_address(addr)
        return bool(ip.is_link_local or ip.is_multicast)
    return False


def _set_features(ifname: str, names: Iterable[str], enable: bool) -> tuple[str, ...]:
    """Switch ethtool features of a device; returns those that changed.
    Features a driver does not have, or has fixed, are left alone."""
    names = tuple(names)
    if not names:
        return ()
    from pyroute2.ethtool import Ethtool

    try:
        eth = Ethtool()
    except Exception:  # noqa: BLE001 (no ethtool netlink: nothing to change)
        return ()
    changed = []
    try:
        feats = eth.get_features(ifname)
        for name in names:
            feat = feats.features.get(name)
            if feat is not None and feat.available and bool(feat.enable) != enable:
                feat.enable = enable
                changed.append(name)
        if changed:
            eth.set_features(ifname, feats)
    except Exception as exc:  # noqa: BLE001 (a device that refuses keeps its features)
        log.warning("%s: cannot switch %s: %s", ifname, ", ".join(names), exc)
        return ()
    finally:
        eth.close()
    return tuple(changed)


def _percentiles(values: array[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"n": len(ordered), "p50": pick(0.5), "p99": pick(0.99), "max": round(ordered[-1], 3)}


def _fmt(key: FlowKey) -> str:
    proto = {6: "tcp", 17: "udp"}.get(key.proto, str(key.proto))
    return f"{proto} {key.src}:{key.sport} > {key.dst}:{key.dport} on {key.ifindex}"


def _flow_row(key: FlowKey, state: str, packets: int, nbytes: int,
              names: dict[int, str]) -> dict[str, Any]:
    return {
        "family": "ipv4" if key.family == socket.AF_INET else "ipv6",
        "proto": {6: "tcp", 17: "udp"}.get(key.proto, str(key.proto)),
        "src": str(key.src), "dst": str(key.dst), "sport": key.sport, "dport": key.dport,
        "state": state, "packets": packets, "bytes": nbytes,
        "in_dev": names.get(key.ifindex, str(key.ifindex)),
        "vlan": [v for v in (key.vlan_outer, key.vlan_inner) if v],
        "pppoe_sid": key.pppoe_sid or None,
    }


def _nat_of(raw: bytes) -> dict[str, Any] | None:
    lay = layout()
    f = lay.from_bytes("struct ofl_flow", raw)
    v = f.v
    fam = socket.AF_INET6 if any(bytes(lay.ffi.buffer(v.nat_saddr))[4:]) or any(
        bytes(lay.ffi.buffer(v.nat_daddr))[4:]) else socket.AF_INET
    out: dict[str, Any] = {}
    n = 4 if fam == socket.AF_INET else 16
    if v.flags & lay.const("OFL_V_SNAT"):
        out["src"] = str(ipaddress.ip_address(bytes(lay.ffi.buffer(v.nat_saddr))[:n]))
    if v.flags & lay.const("OFL_V_DNAT"):
        out["dst"] = str(ipaddress.ip_address(bytes(lay.ffi.buffer(v.nat_daddr))[:n]))
    if v.flags & lay.const("OFL_V_SPORT"):
        out["sport"] = socket.ntohs(v.nat_sport)
    if v.flags & lay.const("OFL_V_DPORT"):
        out["dport"] = socket.ntohs(v.nat_dport)
    return out or None


def _ct_timeouts() -> dict[str, int]:
    """The conntrack timeouts this namespace uses for established TCP and
    UDP streams (read, never changed: no global sysctl is touched)."""
    base = Path("/proc/sys/net/netfilter")

    def read(name: str, default: int) -> int:
        try:
            return int((base / name).read_text())
        except (OSError, ValueError):
            return default

    return {"tcp": read("nf_conntrack_tcp_timeout_established", 432000),
            "udp": read("nf_conntrack_udp_timeout_stream", 120),
            "udp-new": read("nf_conntrack_udp_timeout", 30)}


def run_agent(settings: Settings, *, interfaces: list[str], hook: str, object_path: str,
              load_settings: Callable[[], Settings] | None = None,
              on_ready: Callable[[Agent], None] | None = None) -> None:
    agent = Agent(settings, interfaces=interfaces, hook=hook, object_path=object_path)
    agent.load_settings = load_settings
    try:
        agent.start()
        if on_ready:
            on_ready(agent)
        agent.run()
    finally:
        agent.shutdown()
        log.info("stopped; programs detached")
