"""What the agent decides about a flow, and why: one enum per question.

``Decision``  what became of a tuple the datapath reported (offload, pass, wait)
``PassReason`` why a connection stays with the kernel for good
``Teardown``   why an offloaded flow was handed back to the kernel
``DropReason`` why the datapath drops a tuple early

The agent's counters, ``status`` and the tables in docs/design.md are keyed
by these members, so a new reason has exactly one home. ``offloadable`` is
the conntrack gate (pure: an entry in, a decision or a reason out);
``Exclusions`` is the configuration's say.
"""

from __future__ import annotations

import enum
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from pyroute2.netlink.nfnetlink.nfctsocket import (
    IPS_ASSURED,
    IPS_CONFIRMED,
    IPS_DYING,
    IPS_OFFLOAD,
    IPS_SEQ_ADJUST,
    TCP_CONNTRACK_ESTABLISHED,
)

from . import csum
from .conntrack import IPS_HW_OFFLOAD, CtEntry, IPAddress, IPNetwork, Tuple5, tcp_closing
from .datapath import FlowKey, Verdict
from .errors import ResolveError
from .layout import layout
from .routing import Egress, PerPacketRoute


class Decision(enum.Enum):
    OFFLOAD = "offload"
    PASS = "pass"
    WAIT = "wait"  # not decidable yet: asked again on the next event or packet
    DROP = "drop"  # the kernel drops it anyway: dropped early for a while (DropReason)


class PassReason(enum.StrEnum):
    """Why a tuple was marked pass (the kernel keeps it until it ends)."""

    DYING = "dying"
    UNCONFIRMED = "unconfirmed"
    HELPER = "helper"
    SEQ_ADJUST = "seq-adjust"
    FLOWTABLE = "in an nf flowtable"
    UDP_DISABLED = "udp disabled"
    EXCLUDED = "excluded by configuration"
    NO_PATH = "no path"  # the resolver could not reach the lowest device
    # The route may depend on what conntrack does not tell (routing.PerPacketRoute):
    POLICY_MARK = "policy-mark"  # an fwmark rule, and the mark is set per packet
    POLICY_TOS = "policy-tos"  # a rule on DSCP/TOS that changes the route
    NAT_DEVICE = "nat-device"  # source NAT to another device's address (see source_nat_elsewhere)
    SHAPED = "shaped"  # hybrid: a shaper on the way out that TC cannot reach (Decider._past_shapers)


class Teardown(enum.StrEnum):
    """Why offloaded flows went back to the kernel (status: agent.torn_down)."""

    TCP_FLAGS = "tcp-flags"  # the datapath saw FIN, RST or SYN
    IDLE = "idle"
    CT_DESTROYED = "conntrack-destroyed"  # DESTROY event, or a closing TCP state
    CT_GONE = "conntrack-gone"  # a refresh or a reconcile found no entry (an event was lost)
    CT_MARK = "conntrack-mark"  # the connection's mark changed: its route may have
    NETWORK = "route or link change"
    FDB = "fdb change"
    NEIGHBOUR = "neighbour change"
    FLUSH_COMMAND = "flush command"
    CONFIG = "configuration change"
    RULESET = "ruleset change"  # nftables said a forwarding table changed


class DropReason(enum.StrEnum):
    """Why the datapath drops a tuple early (status: agent.dropped, and the
    datapath's drop_* counters). The order is the header's OFL_DROP_*."""

    ROUTE = "route"  # the input route lookup drops it silently (blackhole, martian source)
    UNREACHABLE = "unreachable"  # unreachable/prohibit/no route, and it kept coming (learned)
    LEARNED = "learned"  # it kept coming and conntrack never confirmed it (learned)

    @property
    def wire(self) -> int:
        """Its OFL_DROP_* number."""
        return list(DropReason).index(self)


def offloadable(entry: CtEntry, *, offload_udp: str) -> Decision | PassReason:
    """The conntrack gate: ``Decision.OFFLOAD`` when ``entry`` may be
    offloaded, ``Decision.WAIT`` when not yet, or why never."""
    if entry.status & IPS_DYING:
        return PassReason.DYING
    if not entry.status & IPS_CONFIRMED:
        return PassReason.UNCONFIRMED
    if entry.helper:
        return PassReason.HELPER
    if entry.status & IPS_SEQ_ADJUST:
        return PassReason.SEQ_ADJUST
    if entry.status & (IPS_OFFLOAD | IPS_HW_OFFLOAD):
        return PassReason.FLOWTABLE
    if entry.orig.proto == socket.IPPROTO_TCP:
        if entry.tcp_state != TCP_CONNTRACK_ESTABLISHED:
            return Decision.WAIT  # not yet (or no longer) established
        return Decision.OFFLOAD
    if offload_udp == "no":
        return PassReason.UDP_DISABLED
    if offload_udp == "assured" and not entry.status & IPS_ASSURED:
        return Decision.WAIT
    return Decision.OFFLOAD


def unresolved(exc: ResolveError) -> PassReason:
    """Why a flow whose path could not be resolved stays with the kernel."""
    if isinstance(exc, PerPacketRoute):
        return PassReason.POLICY_TOS if exc.by_tos else PassReason.POLICY_MARK
    return PassReason.NO_PATH


def source_nat_elsewhere(key: FlowKey, target: Tuple5, owner: int | None, l3_oif: int) -> bool:
    """The packet's source is rewritten to a local address of another device
    than the one its route now leaves by (``owner``: that address's device).
    Masquerade picked the address of the device the connection left by
    first, and the kernel kills such a connection when its output device
    changes (nf_nat_inet_fn, nf_nat_oif_changed) and drops the packet: a
    connection moved to another uplink by its mark (mwan3) must not be
    forwarded out of it with the first uplink's address. Kept with the
    kernel, which decides (a static SNAT to another device's address is
    forwarded there, and only loses the offload)."""
    return target.src != key.src and owner is not None and owner != l3_oif


def closing(entry: CtEntry) -> bool:
    """A TCP connection in FIN_WAIT .. CLOSE: the kernel must see the rest."""
    return entry.orig.proto == socket.IPPROTO_TCP and tcp_closing(entry.tcp_state)


@dataclass(frozen=True)
class Exclusions:
    """What the configuration keeps away from offload: source and
    destination networks, and the devices of excluded firewall zones."""

    src: tuple[IPNetwork, ...] = ()
    dst: tuple[IPNetwork, ...] = ()
    ifindexes: frozenset[int] = field(default_factory=frozenset)

    def excludes(self, src: IPAddress, dst_after_nat: IPAddress, ifindexes: Iterable[int]) -> bool:
        if any(src in net for net in self.src if net.version == src.version):
            return True
        if any(dst_after_nat in net for net in self.dst if net.version == dst_after_nat.version):
            return True
        return any(i in self.ifindexes for i in ifindexes)


def verdict_for(key: FlowKey, path: Egress, target: Tuple5, entry: CtEntry,
                is_reply: bool) -> Verdict:
    """The verdict that forwards ``key`` along ``path``, rewritten to
    ``target`` (its tuple after NAT). A UDP flow's is young: its conntrack
    entry has the kernel's own timeout, which the sweep renews only if the
    flow carries a packet (most new UDP flows, DNS, end with their reply)."""
    return Verdict(oif=path.oif, l2=path.l2, mtu=path.mtu, key=key, nat_src=target.src,
                   nat_dst=target.dst, nat_sport=target.sport, nat_dport=target.dport,
                   reply=is_reply, zone=entry.zone, assured=entry.assured,
                   mark=entry.mark, young=key.proto == socket.IPPROTO_UDP)


TEMPLATES_KEPT = 4096  # verdict templates (112 bytes and a key each); all dropped when full


class VerdictPacker:
    """The ofl_flow value of a new flow, without building a Verdict.

    Of a verdict, only the ports (the NAT ports and the port checksum
    delta) and the last-seen stamp differ between the flows of one path,
    addresses and conntrack facts: everything else is packed once by
    ``Verdict.pack`` into a template, keyed by all that it depends on, and
    each flow patches its few bytes in. ``pack`` returns what
    ``verdict_for(...).pack(last_seen_ns=...)`` returns (a unit test holds
    the two equal)."""

    def __init__(self) -> None:
        lay = layout()
        off = lay.ffi.offsetof
        self._sport = off("struct ofl_flow", "v", "nat_sport")
        self._dport = off("struct ofl_flow", "v", "nat_dport")
        self._l4_port = off("struct ofl_flow", "v", "csum_l4_port")
        self._last = off("struct ofl_flow", "last_seen_ns")
        self._flags = off("struct ofl_flow", "v", "flags")
        self._templates: dict[tuple[object, ...], bytes] = {}

    def pack(self, raw: bytes, own: Tuple5, path: Egress, target: Tuple5, entry: CtEntry,
             is_reply: bool, last_seen_ns: int, flags: int = 0) -> bytes:
        """The value for raw key ``raw``, whose tuple is ``own``, with the
        verdict's ``flags`` added (OFL_V_TC for a flow TC must forward)."""
        sport, dport, new_sport, new_dport = own.sport, own.dport, target.sport, target.dport
        nat_sport, nat_dport = new_sport != sport, new_dport != dport
        tk = (path, own.proto, own.src, own.dst, target.src, target.dst, is_reply, entry.zone,
              entry.status, entry.mark, nat_sport, nat_dport)
        template = self._templates.get(tk)
        if template is None:
            if len(self._templates) >= TEMPLATES_KEPT:
                self._templates.clear()
            template = verdict_for(FlowKey.unpack(raw), path, target, entry, is_reply).pack()
            self._templates[tk] = template
        out = bytearray(template)
        if nat_sport:
            struct.pack_into("!H", out, self._sport, new_sport)
        if nat_dport:
            struct.pack_into("!H", out, self._dport, new_dport)
        if nat_sport or nat_dport:
            port_delta = csum.delta(struct.pack("!HH", sport, dport),
                                    struct.pack("!HH", new_sport, new_dport))
        else:
            port_delta = 0
        struct.pack_into("!H", out, self._l4_port, port_delta)
        struct.pack_into("=Q", out, self._last, last_seen_ns)
        if flags:
            out[self._flags] |= flags
        return bytes(out)
