"""Next hop resolution over RTNETLINK, down to the lowest device.

For a packet of a flow the resolver asks the kernel's FIB what it would do
(an input route lookup with the packet's ingress interface, addresses after
DNAT, protocol and ports), finds the neighbour's MAC, and walks from the
route's output device down to the device the datapath transmits on:

    route oif --(bridge: FDB lookup of the neighbour MAC)--> bridge port
              --(lower layers: VLAN, PPPoE, DSA, see issue 5)--> lowest device

Link, route and neighbour facts are cached and dropped on RTNETLINK events.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .datapath import FlowKey, L2Header
from .errors import ResolveError

log = logging.getLogger(__name__)

RTN_UNICAST = 1
NUD_VALID = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # REACHABLE STALE DELAY PROBE NOARP PERMANENT
NTF_MASTER = 0x04
RTMGRP_LINK = 0x1
RTMGRP_NEIGH = 0x4
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV4_RULE = 0x80
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
RT_GROUPS = (RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV4_RULE
             | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE)
RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_NEWNEIGH, RTM_DELNEIGH = 28, 29

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class NotYet(ResolveError):
    """Resolution cannot finish now but may later (neighbour or FDB entry missing)."""


@dataclass(frozen=True, slots=True)
class Link:
    index: int
    name: str
    kind: str  # "" for a plain device, else IFLA_INFO_KIND (bridge, veth, vlan, ppp, ...)
    master: int
    mac: bytes
    mtu: int
    up: bool
    link: int  # IFLA_LINK: lower device of a VLAN, 0 if none


@dataclass(frozen=True, slots=True)
class Path:
    """A resolved egress: the lowest device, the L2 header, the path MTU, and
    what it depends on (for invalidation)."""

    oif: int
    l2: L2Header
    mtu: int
    l3_oif: int
    nexthop: IPAddress


@dataclass(frozen=True, slots=True)
class Ingress:
    """Where a packet entered at L3: the logical device the kernel would use."""

    l3_iif: int


# Plug-ins for lower layers: given the L3 output device and the L2 header built
# so far, return (lower device, header) one level down, or None if not theirs.
LowerStep = Callable[["Resolver", Link, L2Header], "tuple[Link, L2Header] | None"]
# Given a key (lowest device plus tags), return the L3 ingress device, or None.
IngressStep = Callable[["Resolver", FlowKey], "int | None"]


class Resolver:
    def __init__(self, ipr: IPRoute | None = None) -> None:
        self.ipr = ipr or IPRoute()
        self._links: dict[int, Link] = {}
        self._routes: dict[tuple[Any, ...], tuple[int, IPAddress]] = {}
        self._neigh: dict[tuple[int, IPAddress], bytes] = {}
        self.lower_steps: list[LowerStep] = [_bridge_step]
        self.ingress_steps: list[IngressStep] = [_bridge_ingress]

    # -- caches ----------------------------------------------------------------
    def link(self, index: int) -> Link:
        if index not in self._links:
            try:
                msg = self.ipr.link("get", index=index)[0]
            except NetlinkError as exc:
                raise ResolveError(f"no device with ifindex {index}") from exc
            self._links[index] = _link_from(msg)
        return self._links[index]

    def link_by_name(self, name: str) -> Link:
        found = self.ipr.link_lookup(ifname=name)
        if not found:
            raise ResolveError(f"no device named {name}")
        return self.link(found[0])

    def links(self) -> list[Link]:
        return [_link_from(m) for m in self.ipr.get_links()]

    def forget(self, *, links: bool = False, routes: bool = False, neigh: bool = False) -> None:
        if links:
            self._links.clear()
        if routes:
            self._routes.clear()
        if neigh:
            self._neigh.clear()

    def forget_neigh(self, ifindex: int, addr: IPAddress) -> None:
        self._neigh.pop((ifindex, addr), None)

    # -- the walk ----------------------------------------------------------------
    def ingress(self, key: FlowKey) -> Ingress:
        for step in self.ingress_steps:
            found = step(self, key)
            if found is not None:
                return Ingress(found)
        return Ingress(key.ifindex)

    def route(self, iif: int, key: FlowKey, dst: IPAddress) -> tuple[int, IPAddress]:
        """(output ifindex, next hop address) as the kernel's input route
        lookup gives them for this packet."""
        ck = (iif, key.src, dst, key.proto, key.sport, key.dport)
        hit = self._routes.get(ck)
        if hit:
            return hit
        try:
            msg = self.ipr.route("get", dst=str(dst), src=str(key.src), iif=iif,
                                 ip_proto=key.proto, sport=key.sport, dport=key.dport)[0]
        except NetlinkError as exc:
            raise ResolveError(f"no route to {dst} from ifindex {iif}: {exc}") from exc
        if msg["type"] != RTN_UNICAST:
            raise ResolveError(f"{dst} is not forwarded (route type {msg['type']})")
        oif = msg.get("RTA_OIF")
        if not oif:
            raise ResolveError(f"route to {dst} has no output device")
        gw = msg.get("RTA_GATEWAY")
        hop = ipaddress.ip_address(gw) if gw else dst
        self._routes[ck] = (oif, hop)
        return oif, hop

    def neighbour(self, oif: int, hop: IPAddress) -> bytes:
        ck = (oif, hop)
        if ck in self._neigh:
            return self._neigh[ck]
        family = socket.AF_INET if hop.version == 4 else socket.AF_INET6
        try:
            msgs = self.ipr.neigh("get", dst=str(hop), ifindex=oif, family=family)
        except NetlinkError as exc:
            if exc.code in (errno.ENOENT, errno.ENODATA):
                raise NotYet(f"neighbour {hop} unresolved") from exc
            raise ResolveError(f"neighbour lookup of {hop}: {exc}") from exc
        for m in msgs:
            mac = m.get("NDA_LLADDR")
            if mac and m["state"] & NUD_VALID:
                value = bytes.fromhex(mac.replace(":", ""))
                self._neigh[ck] = value
                return value
        raise NotYet(f"neighbour {hop} unresolved")

    def fdb_port(self, bridge: int, mac: bytes) -> int:
        lladdr = ":".join(f"{b:02x}" for b in mac)
        try:
            msgs = self.ipr.fdb("get", lladdr=lladdr, master=bridge)
        except NetlinkError as exc:
            raise NotYet(f"{lladdr} not in the FDB of ifindex {bridge}") from exc
        for m in msgs:
            port = m.get("ifindex") or 0
            if port and port != bridge:
                return int(port)
        raise NotYet(f"{lladdr} not in the FDB of ifindex {bridge}")

    def resolve(self, key: FlowKey, dst: IPAddress) -> Path:
        """Where a packet of ``key`` goes once its destination is ``dst``."""
        ingress = self.ingress(key)
        l3_oif, hop = self.route(ingress.l3_iif, key, dst)
        l3 = self.link(l3_oif)
        if not l3.up:
            raise ResolveError(f"{l3.name} is down")
        dmac = self.neighbour(l3_oif, hop)
        header = L2Header(dmac=dmac, smac=l3.mac)
        dev = l3
        for _ in range(8):  # bounded: bridge over VLAN over DSA is three levels
            for step in self.lower_steps:
                lower = step(self, dev, header)
                if lower is not None:
                    dev, header = lower
                    break
            else:
                break
        if not dev.up:
            raise ResolveError(f"{dev.name} is down")
        mtu = min(l3.mtu, dev.mtu - header.overhead())
        return Path(oif=dev.index, l2=header, mtu=mtu, l3_oif=l3_oif, nexthop=hop)

    def close(self) -> None:
        self.ipr.close()


def _link_from(msg: Any) -> Link:
    mac = msg.get("IFLA_ADDRESS") or "00:00:00:00:00:00"
    kind = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") or ""
    return Link(
        index=msg["index"],
        name=msg.get("IFLA_IFNAME") or "",
        kind=kind,
        master=msg.get("IFLA_MASTER") or 0,
        mac=bytes.fromhex(mac.replace(":", "")) if len(mac) == 17 else b"\0" * 6,
        mtu=msg.get("IFLA_MTU") or 1500,
        up=bool(msg["flags"] & 1),
        link=msg.get("IFLA_LINK") or 0,
    )


def _bridge_step(res: Resolver, dev: Link, header: L2Header) -> tuple[Link, L2Header] | None:
    """A bridge sends to the port its FDB has the destination MAC on."""
    if dev.kind != "bridge":
        return None
    port = res.fdb_port(dev.index, header.dmac)
    return res.link(port), header


def _bridge_ingress(res: Resolver, key: FlowKey) -> int | None:
    """A frame received on a bridge port enters L3 on the bridge."""
    if key.vlan_outer or key.pppoe_sid:
        return None
    dev = res.link(key.ifindex)
    if dev.master:
        master = res.link(dev.master)
        if master.kind == "bridge":
            return master.index
    return None


def attach_points(res: Resolver, names: list[str]) -> list[Link]:
    """The lowest devices under the interfaces the user named: a bridge's
    ports, or the device itself."""
    out: dict[int, Link] = {}
    all_links = res.links()
    for name in names:
        dev = res.link_by_name(name)
        if dev.kind == "bridge":
            for port in all_links:
                if port.master == dev.index:
                    out[port.index] = port
        else:
            out[dev.index] = dev
    return list(out.values())


def rt_event_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    except OSError:
        pass
    sock.bind((0, RT_GROUPS))
    sock.setblocking(False)
    return sock
