"""RTNETLINK events, turned into the flows they invalidate.

The watcher reads what the kernel says changed (links, addresses, routes,
rules, neighbours, bridge FDB entries, qdiscs), drops the resolver's cached facts
that the change touches, and answers with ``Changes``: which flows the loop
must resolve again (a route's prefix, a rule's selector, everything: see
offloader/reresolve.py) and which it must hand back (all of them after a
link change, the flows to a MAC). It never touches the maps itself.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELNEIGH,
    RTM_DELQDISC,
    RTM_DELROUTE,
    RTM_DELRULE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTM_NEWQDISC,
    RTM_NEWROUTE,
    RTM_NEWRULE,
)

from .decision import Teardown
from .reresolve import Scope, address_selectors, route_selector, rule_selector
from .routing import NUD_VALID, RTM_F_CLONED, Resolver

log = logging.getLogger(__name__)

RT_TABLE_LOCAL = 255
READ_BUDGET = 64  # datagrams per wake-up: the loop stays responsive under a storm
NEIGHBOURS_KEPT = 8192  # neighbours' last known MACs (all dropped when full)


@dataclass
class Changes:
    """What the loop must do after a batch of events."""

    # The offloaded flows that routes, rules or addresses that changed (or
    # lost events) could re-route: resolved again (empty: none).
    reresolve: Scope = field(default_factory=Scope)
    # A link that changed or went: every flow handed back at once (a pass
    # would leave flows redirected into a link that is down until it
    # reached them).
    flush_all: bool = False
    links_gone: set[int] = field(default_factory=set)  # ifindexes deleted
    macs: dict[bytes, Teardown] = field(default_factory=dict)  # flows to this MAC must go
    # Something a resolved path depends on moved (a route, rule or address,
    # a link, a neighbour's MAC, appearance or disappearance, an FDB entry):
    # the paths cached per host pair go. A neighbour that only ages
    # (REACHABLE -> STALE -> DELAY) moves nothing.
    paths_moved: bool = False


class NetWatcher:
    def __init__(self, sock: socket.socket, resolver: Resolver, parser: Any) -> None:
        self.sock = sock
        self.resolver = resolver
        self.parser = parser  # anything with .marshal.parse (an IPRoute)
        # (L3 output device, next hop) -> the MAC offloaded flows use
        self.nexthops: dict[tuple[int, Any], bytes] = {}
        # local address -> its device, as the events left it (the socket
        # was bound before this snapshot: no change falls in between)
        self.addresses: dict[Any, int] = resolver.local_addresses()
        # (device, neighbour) -> its MAC while valid, as the last event said
        self.neighbours: dict[tuple[int, Any], bytes] = {}
        self.queueing_changes = 0  # qdisc events that changed what decisions use
        self._qdiscs_read = False  # in this read of the socket

    def fileno(self) -> int:
        return self.sock.fileno()

    def used(self, l3_oif: int, hop: Any, mac: bytes) -> None:
        """An offloaded flow goes to ``hop`` on ``l3_oif`` with ``mac``."""
        self.nexthops[(l3_oif, hop)] = mac

    def forget_nexthops(self) -> None:
        self.nexthops.clear()

    def read(self) -> Changes:
        out = Changes()
        self._qdiscs_read = False
        for _ in range(READ_BUDGET):
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError:  # ENOBUFS: changes were missed, nothing cached is sure
                self.resolver.forget(links=True, routes=True, neigh=True)
                self.resolver.forget_queueing()
                self.neighbours.clear()
                out.reresolve.add(None)
                out.paths_moved = True
                break
            for msg in self.parser.marshal.parse(data):
                self.on_message(msg, out)
        return out

    def on_message(self, msg: Any, out: Changes) -> None:
        kind = msg["header"]["type"]
        if kind in (RTM_NEWLINK, RTM_DELLINK):
            out.paths_moved = True
            out.flush_all |= self._on_link(msg, kind == RTM_DELLINK, out)
        elif kind in (RTM_NEWNEIGH, RTM_DELNEIGH):
            self._on_neigh(msg, kind == RTM_DELNEIGH, out)
        elif kind in (RTM_NEWQDISC, RTM_DELQDISC):
            self._on_qdisc(msg, out)
        elif kind in (RTM_NEWROUTE, RTM_DELROUTE) and msg["flags"] & RTM_F_CLONED:
            return  # a route cache entry (IPv6 creates them on lookups)
        elif irrelevant(msg) or (kind in (RTM_NEWADDR, RTM_DELADDR)
                                 and not self._address_changed(msg, kind == RTM_DELADDR)):
            return
        elif kind in (RTM_NEWROUTE, RTM_DELROUTE):
            sel = route_selector(msg)
            self.resolver.forget_routes_to(sel.covers_dst)  # the rest of the cache holds
            out.reresolve.add(sel)
            out.paths_moved = True
        elif kind in (RTM_NEWRULE, RTM_DELRULE):
            self.resolver.forget(routes=True)  # which facts a lookup carries may change
            out.reresolve.add(rule_selector(msg))
            out.paths_moved = True
        elif kind in (RTM_NEWADDR, RTM_DELADDR):
            self.resolver.forget(routes=True)  # local addresses, the walks up
            out.paths_moved = True
            if self._under_macvlan(msg["index"]):
                out.reresolve.add(None)  # the walk up from it may change (devstack.Macvlan)
            for sel in address_selectors(msg):
                out.reresolve.add(sel)

    def _on_qdisc(self, msg: Any, out: Changes) -> None:
        """A qdisc added, changed or removed (SQM started or stopped): which
        flows must go through TC to meet a shaper (Decider.tc_only) may have
        changed. The qdiscs are read again, once per read of the socket (the
        events it holds all came before the read), and only when what the
        decisions use changed (a shaper's kind on a device, an ingress qdisc)
        is every offloaded flow resolved again: cake-autorate changes cake's
        rate several times a second. A clsact (the agent's own attach, or
        another tool's filters) queues nothing."""
        if msg.get("TCA_KIND") == "clsact" or self._qdiscs_read:
            return
        self._qdiscs_read = True
        before = self.resolver.cached_queueing()
        self.resolver.forget_queueing()
        try:
            if before is not None and self.resolver.queueing() == before:
                return
        except (NetlinkError, OSError):  # nothing kept: read again when a decision asks
            pass
        self.queueing_changes += 1
        out.reresolve.add(None)
        out.paths_moved = True

    def _under_macvlan(self, index: int) -> bool:
        """Whether a macvlan sits on ``index``: frames arriving on a device
        with one macvlan and no address of its own are the macvlan's."""
        try:
            return any(d.lower == index and d.kind in ("macvlan", "macvtap")
                       for d in self.resolver.links())
        except (NetlinkError, OSError):
            return True

    def _address_changed(self, msg: Any, deleted: bool) -> bool:
        """False for an address the device had already (a DHCP renewal or a
        router advertisement refreshing its lifetimes): nothing moved."""
        addr = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
        if not addr:
            return True
        ip = ipaddress.ip_address(addr.split("%")[0])
        if deleted:
            self.addresses.pop(ip, None)
            return True
        if self.addresses.get(ip) == msg["index"]:
            return False
        self.addresses[ip] = msg["index"]
        return True

    def _on_link(self, msg: Any, deleted: bool, out: Changes) -> bool:
        index = msg["index"]
        cached = self.resolver.cached_link(index)
        if deleted:
            out.links_gone.add(index)
        if cached is None:
            return False
        self.resolver.forget(links=True, routes=True)
        if deleted:
            return True
        fresh = self.resolver.link(index)
        return (fresh.up, fresh.mtu, fresh.mac, fresh.master) != (
            cached.up, cached.mtu, cached.mac, cached.master)

    def _on_neigh(self, msg: Any, deleted: bool, out: Changes) -> None:
        if msg["family"] == socket.AF_BRIDGE:
            self._on_fdb(msg, deleted, out)
            return
        dst = msg.get("NDA_DST")
        if not dst:
            return
        hop = ipaddress.ip_address(dst)
        ck = (msg["ifindex"], hop)
        lladdr = msg.get("NDA_LLADDR")
        new = bytes.fromhex(lladdr.replace(":", "")) if lladdr else b""
        valid = b"" if deleted or not msg["state"] & NUD_VALID else new
        if self.neighbours.get(ck) != valid:
            # appeared, went, or another MAC: paths through it are stale
            self.resolver.forget_neigh(msg["ifindex"], hop)
            out.paths_moved = True
            if len(self.neighbours) >= NEIGHBOURS_KEPT:
                self.neighbours.clear()
            self.neighbours[ck] = valid
        used = self.nexthops.get(ck)
        if used is None:
            return
        if deleted or new != used or not msg["state"] & NUD_VALID:
            del self.nexthops[ck]
            out.macs[used] = Teardown.NEIGHBOUR

    def _on_fdb(self, msg: Any, deleted: bool, out: Changes) -> None:
        """A bridge FDB entry: a host moved to another port (roaming), or left."""
        mac = msg.get("NDA_LLADDR")
        if not mac:
            return
        raw = bytes.fromhex(mac.replace(":", ""))
        port = msg["ifindex"]
        cached = self.resolver.fdb_ports(raw)
        if deleted or any(p != port for p in cached):
            self.resolver.forget_fdb(raw)
            out.macs[raw] = Teardown.FDB
            out.paths_moved = True


def irrelevant(msg: Any) -> bool:
    """Route and address events that cannot change a forwarding decision:
    IPv6 link-local and multicast ones, the local table's."""
    if msg.get("RTA_TABLE") == RT_TABLE_LOCAL:
        return True
    addr = msg.get("RTA_DST") or msg.get("IFA_ADDRESS")
    if addr and ":" in addr:
        ip = ipaddress.ip_address(addr)
        return bool(ip.is_link_local or ip.is_multicast)
    return False
