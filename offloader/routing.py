"""Next hop resolution over RTNETLINK, down to the lowest device.

For a packet of a flow the resolver asks the kernel's FIB what it would do
(an input route lookup with the packet's ingress interface, addresses after
DNAT, protocol and ports), finds the neighbour's MAC, and walks from the
route's output device down to the device the datapath transmits on:

    route oif --(bridge: FDB lookup of the neighbour MAC)--> bridge port
              --(lower layers: VLAN, PPPoE, DSA)--> lowest device

How each kind of device is passed (down, up, and where hooks attach) is
described once, in offloader/devstack.py; this module supplies the facts
(links, routes, neighbours, FDB, sysfs) and caches them, dropped on
RTNETLINK events.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2.iproute import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (
    RTM_DELLINK,
    RTM_DELNEIGH,
    RTM_DELROUTE,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV4_RULE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_LINK,
    RTMGRP_NEIGH,
    RTMGRP_TC,
    rtypes,
)
from pyroute2.netlink.rtnl.ifinfmsg import BRIDGE_VLAN_INFO_UNTAGGED, IFF_UP
from pyroute2.netlink.rtnl.ndmsg import (
    NUD_DELAY,
    NUD_NOARP,
    NUD_PERMANENT,
    NUD_PROBE,
    NUD_REACHABLE,
    NUD_STALE,
)
from pyroute2.protocols import ETH_P_8021Q

from . import policy, pppoe
from .datapath import DSA_PORT_NONE, DSA_PROTOS, FlowKey, L2Header
from .devstack import AttachPoint, Link, Rx, dsa_tag_len, walk_attach, walk_down, walk_up
from .errors import ResolveError

log = logging.getLogger(__name__)

__all__ = [
    "AF_BRIDGE", "NUD_VALID", "RTM_DELLINK", "RTM_DELNEIGH", "RTM_DELROUTE", "RTM_F_CLONED",
    "RTM_NEWLINK", "RTM_NEWNEIGH", "RTM_NEWROUTE", "AttachPoint", "Egress", "Ingress", "Link",
    "NotYet", "Queueing", "Resolver", "RouteLookup", "attach_points", "rt_event_socket",
]

AF_BRIDGE = socket.AF_BRIDGE  # FDB entries in RTM_NEWNEIGH/RTM_DELNEIGH
RTN_UNICAST = rtypes["RTN_UNICAST"]
RTN_LOCAL = rtypes["RTN_LOCAL"]
SYSFS_NET = Path("/sys/class/net")
NUD_VALID = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_NOARP | NUD_PERMANENT
RT_GROUPS = (RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV4_RULE
             | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE | RTMGRP_TC)
# Qdiscs a device has when nobody set up queueing on it: the kernel's and
# OpenWrt's defaults (fq_codel is OpenWrt's default_qdisc), and clsact, which
# holds filters (the agent's own) and queues nothing. Any other egress qdisc,
# at the root or under mq, is somebody's shaper or scheduler (SQM's cake,
# htb, hfsc, tbf, ...), which only packets through the device's qdisc layer see.
PLAIN_QDISCS = frozenset({"noqueue", "mq", "pfifo_fast", "fq_codel", "fq", "pfifo", "bfifo",
                          "pfifo_head_drop", "clsact"})
QUEUEING_WALK = 8  # devices looked at from the routed one down (VLAN, DSA user port)
RTM_F_CLONED = 0x200  # a route cache entry (uapi rtnetlink.h; pyroute2 has no name for it)
PPPOE_HLEN = 8  # PPPoE session header and PPP protocol (RFC 2516)
VLAN_HLEN = 4
# An XDP redirect (xdp_ok_fwd_dev() in the kernel) takes a frame of at most
# MTU + 14 + 4 bytes: one VLAN tag's worth of L2 beyond Ethernet.
XDP_L2_SLACK = VLAN_HLEN

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class NotYet(ResolveError):
    """Resolution cannot finish now but may later (neighbour or FDB entry missing)."""


class PerPacketRoute(ResolveError):
    """The policy rules may route this flow's packets differently, by what
    each packet carries and conntrack does not tell: a mark set per packet
    (``by_tos`` False) or the DSCP/TOS field (True)."""

    def __init__(self, message: str, *, by_tos: bool) -> None:
        super().__init__(message)
        self.by_tos = by_tos


@dataclass(frozen=True, slots=True)
class Queueing:
    """Who queues where: ``shapers`` maps a device to the kind of its egress
    qdisc that is not a default one (PLAIN_QDISCS); ``ingress`` holds the
    devices with an ``ingress`` qdisc, which is somebody else's (the agent
    uses clsact): SQM's redirect of downloads to its ifb lives there."""

    shapers: dict[int, str]
    ingress: frozenset[int]
    names: dict[int, str] = field(default_factory=dict, compare=False)  # for status


@dataclass(frozen=True, slots=True)
class Egress:
    """A resolved egress: the lowest device, the L2 header, the path MTU, and
    what it depends on (for invalidation)."""

    oif: int
    l2: L2Header
    mtu: int
    l3_oif: int
    nexthop: IPAddress
    # Hashed once: every new flow of a path keys the verdict templates on it.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.oif, self.l2, self.mtu, self.l3_oif,
                                                self.nexthop)))

    def __hash__(self) -> int:
        return self._hash


@dataclass(frozen=True, slots=True)
class RouteLookup:
    """What the kernel's input route lookup says of a tuple (early drop):
    ``errno`` 0 when it is routed or delivered, else the lookup's error
    (the route type's: EINVAL blackhole, EHOSTUNREACH unreachable, ...)."""

    errno: int
    l3_iif: int
    l3_mac: bytes  # the router's MAC on the ingress L3 device (zero without L2)
    learnable: bool  # unicast to another device, or local: conntrack sees it


INGRESS_CACHED = 4096  # ingress walks remembered (a router has a few dozen)


@dataclass(frozen=True, slots=True)
class Ingress:
    """Where a packet entered at L3: the logical device the kernel would use."""

    l3_iif: int


@dataclass(frozen=True, slots=True)
class RuleFacts:
    """What the policy rules (`ip rule`) match on that a lookup must carry."""

    ports: bool  # some rule matches on the protocol or ports
    fwmarks: tuple[int, ...]  # marks the fwmark rules tell apart (0 first); () without such rules
    tos: tuple[int, ...]  # TOS values the rules tell apart (0 first)

    @classmethod
    def of(cls, rules: list[Any]) -> RuleFacts:
        ports = any(r.get(a) is not None for r in rules
                    for a in ("FRA_SPORT_RANGE", "FRA_DPORT_RANGE", "FRA_IP_PROTO"))
        by_mark = [r for r in rules
                   if r.get("FRA_FWMARK") is not None or r.get("FRA_FWMASK") is not None]
        marks = {int(r.get("FRA_FWMARK") or 0) & int(r.get("FRA_FWMASK") or policy.ALL_BITS)
                 for r in by_mark} - {0}
        tos = {int(r.get("tos") or 0) for r in rules} - {0}
        return cls(ports=ports, fwmarks=(0, *sorted(marks)) if by_mark else (),
                   tos=(0, *sorted(tos)))


class Resolver:
    def __init__(self, ipr: IPRoute | None = None, *, sysfs: Path = SYSFS_NET,
                 pppoe_proc: Path = pppoe.PROC, pppoe_run: Path = pppoe.RUN_DIR,
                 ruleset: policy.Ruleset | None = None) -> None:
        self.ipr = ipr or IPRoute()
        self.sysfs = sysfs
        self.pppoe_proc = pppoe_proc
        self.pppoe_run = pppoe_run
        self._links: dict[int, Link] = {}
        self._all: list[Link] | None = None
        self._routes: dict[tuple[Any, ...], tuple[int, IPAddress]] = {}
        self._neigh: dict[tuple[int, IPAddress], bytes] = {}
        self._fdb: dict[tuple[int, bytes, int], int] = {}
        self._owners: dict[IPAddress, int] | None = None  # local address -> its device
        # (ifindex, DSA port, VLAN ids, PPPoE session) -> the L3 ingress device
        self._ingress: dict[tuple[int, int, int, int, int], Ingress] = {}
        self._rules: RuleFacts | None = None
        self._queueing: Queueing | None = None
        self.ruleset = ruleset or policy.Ruleset()

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
        for dev in self.links():
            if dev.name == name:
                return dev
        raise ResolveError(f"no device named {name}")

    def links(self) -> list[Link]:
        if self._all is None:
            self._all = [_link_from(m) for m in self.ipr.get_links()]
            for dev in self._all:
                self._links.setdefault(dev.index, dev)
        return self._all

    def forget(self, *, links: bool = False, routes: bool = False, neigh: bool = False) -> None:
        if links:
            self._links.clear()
            self._all = None
        if routes:
            self._routes.clear()
            self._rules = None
            self._owners = None
        if links or routes:  # the walk up reads links, addresses (macvlan), bridge VLANs
            self._ingress.clear()
        if neigh:
            self._neigh.clear()
            self._fdb.clear()

    def routes_by_port(self) -> bool:
        """Whether a policy rule matches on the protocol or ports: two flows
        between the same hosts may then route apart. Reads the rules when
        they are not cached (as ``route`` does)."""
        if self._rules is None:
            self._rules = self._rule_facts()
        return self._rules.ports

    def forget_routes_to(self, inside: Callable[[IPAddress], bool]) -> None:
        """A route changed: only the lookups of destinations it could decide
        go (a route never decides one outside its prefix); the rules,
        addresses and walks up stay."""
        for ck in [ck for ck in self._routes if inside(ck[2])]:
            del self._routes[ck]

    def fdb_ports(self, mac: bytes) -> list[int]:
        """Ports the FDB cache holds for ``mac``."""
        return [port for (_b, m, _v), port in self._fdb.items() if m == mac]

    def forget_fdb(self, mac: bytes) -> None:
        for ck in [ck for ck in self._fdb if ck[1] == mac]:
            del self._fdb[ck]

    def forget_neigh(self, ifindex: int, addr: IPAddress) -> None:
        self._neigh.pop((ifindex, addr), None)

    def cached_link(self, index: int) -> Link | None:
        return self._links.get(index)

    # -- qdiscs ------------------------------------------------------------------------
    def queueing(self) -> Queueing:
        """The devices with somebody's egress qdisc or ``ingress`` qdisc, read
        with one dump and kept until ``forget_queueing`` (a qdisc event)."""
        if self._queueing is None:
            shapers: dict[int, str] = {}
            ingress: set[int] = set()
            for msg in self.ipr.get_qdiscs():
                kind = str(msg.get("TCA_KIND") or "")
                if kind == "ingress":
                    ingress.add(msg["index"])
                elif kind not in PLAIN_QDISCS:
                    shapers.setdefault(msg["index"], kind)
            names = {}
            for index in {*shapers, *ingress}:
                try:
                    names[index] = self.link(index).name
                except ResolveError:  # gone meanwhile: its event comes
                    pass
            self._queueing = Queueing(shapers, frozenset(ingress), names)
        return self._queueing

    def forget_queueing(self) -> None:
        self._queueing = None

    def cached_queueing(self) -> Queueing | None:
        return self._queueing

    def shaped_on_the_way(self, path: Egress) -> tuple[int, str] | None:
        """The first device with a shaper (its ifindex and qdisc kind) on
        ``path``'s way out: the routed device, the devices below it that
        IFLA_LINK names (VLAN, DSA user port), and the lowest device."""
        shapers = self.queueing().shapers
        if not shapers:
            return None
        index, seen = path.l3_oif, 0
        while index and seen < QUEUEING_WALK:
            if index in shapers:
                return index, shapers[index]
            if index == path.oif:
                return None
            try:
                index = self.link(index).link
            except ResolveError:
                break
            seen += 1
        return (path.oif, shapers[path.oif]) if path.oif in shapers else None

    # -- sysfs facts (DSA) -----------------------------------------------------------
    def dsa_tagging(self, conduit: Link) -> int:
        """The DSA tag protocol a conduit's frames carry (0 if not a conduit or
        a protocol the datapath does not parse)."""
        try:
            name = (self.sysfs / conduit.name / "dsa" / "tagging").read_text().strip()
        except OSError:
            return 0
        return DSA_PROTOS.get(name, -1)

    def dsa_port(self, dev: Link) -> int | None:
        """The switch port of a DSA user port (phys_port_name "p<N>")."""
        try:
            text = (self.sysfs / dev.name / "phys_port_name").read_text().strip()
        except OSError:
            return None
        if text.startswith("p") and text[1:].isdigit():
            return int(text[1:])
        return None

    def addressed(self, dev: Link) -> bool:
        """Whether ``dev`` has IP addresses of its own."""
        return dev.index in self._address_owners().values()

    def address_owner(self, addr: IPAddress) -> int | None:
        """The device that holds local address ``addr`` (None: not local)."""
        return self._address_owners().get(addr)

    def local_addresses(self) -> dict[IPAddress, int]:
        """A copy of every local address and its device."""
        return dict(self._address_owners())

    def _address_owners(self) -> dict[IPAddress, int]:
        if self._owners is None:
            owners: dict[IPAddress, int] = {}
            for msg in self.ipr.get_addr():
                # IFA_LOCAL is the device's own on point-to-point links
                # (IFA_ADDRESS is the peer there).
                addr = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
                if addr:
                    owners[ipaddress.ip_address(addr.split("%")[0])] = msg["index"]
            self._owners = owners
        return self._owners

    # -- PPPoE sessions (/proc/net/pppoe and the ip-up records) ---------------------
    def pppoe_session(self, ppp: Link) -> pppoe.Session | None:
        return pppoe.session_of(ppp.name, self.pppoe_proc, self.pppoe_run)

    def ppp_of(self, sid: int, dev: Link) -> Link | None:
        names = [d.name for d in self.links() if d.is_ppp]
        name = pppoe.ppp_of(sid, dev.name, names, self.pppoe_proc, self.pppoe_run)
        return None if name is None else self.link_by_name(name)

    # -- the walk up (ingress) ----------------------------------------------------------
    def ingress(self, key: FlowKey) -> Ingress:
        """The L3 device a frame with ``key``'s ingress attributes reaches:
        lowest device -> DSA user port -> VLAN device(s) -> ppp -> bridge.
        Cached per ingress attributes until a link or address changes."""
        ck = (key.ifindex, key.dsa_port, key.vlan_outer, key.vlan_inner, key.pppoe_sid)
        hit = self._ingress.get(ck)
        if hit is not None:
            return hit
        rx = Rx(dsa_port=None if key.dsa_port == DSA_PORT_NONE else key.dsa_port,
                tags=tuple(v for v in (key.vlan_outer, key.vlan_inner) if v),
                pppoe_sid=key.pppoe_sid)
        found = Ingress(walk_up(self, self.link(key.ifindex), rx).index)
        if len(self._ingress) >= INGRESS_CACHED:
            self._ingress.clear()
        self._ingress[ck] = found
        return found

    # -- the walk down (egress) ------------------------------------------------------------
    def route(self, iif: int, key: FlowKey, dst: IPAddress, *,
              mark: int = 0) -> tuple[int, IPAddress]:
        """(output ifindex, next hop address) as the kernel's input route
        lookup gives them for this packet; ``mark`` is the connection's
        conntrack mark (policy routing by fwmark, see offloader/policy.py)."""
        if self._rules is None:
            self._rules = self._rule_facts()
        rules = self._rules
        # What no policy rule matches on does not change the lookup: without
        # such rules, one lookup serves every flow between two hosts.
        ports = (key.proto, key.sport, key.dport) if rules.ports else ()
        marks: tuple[int, ...] = (0,)
        if rules.fwmarks:
            pkt = self.ruleset.setters().packet_mark(mark)
            # Unknown: the flow can still go when every mark the rules tell
            # apart gives the same route.
            marks = (pkt,) if pkt is not None else rules.fwmarks
        found = {self._lookup(iif, key, dst, ports, m, t) for m in marks for t in rules.tos}
        if len(found) > 1 and len(marks) > 1:
            raise PerPacketRoute("policy routing by fwmark, and the packet mark is set per packet "
                                 "without being restored from the connection's mark: its route "
                                 "cannot be told", by_tos=False)
        if len(found) > 1:
            raise PerPacketRoute("a policy rule matches on DSCP/TOS, which may differ per packet",
                                 by_tos=True)
        return found.pop()

    def _lookup(self, iif: int, key: FlowKey, dst: IPAddress, ports: tuple[int, ...], mark: int,
                tos: int) -> tuple[int, IPAddress]:
        ck = (iif, key.src, dst, *ports, mark, tos)
        hit = self._routes.get(ck)
        if hit:
            return hit
        try:
            msg = self.ipr.route("get", dst=str(dst), src=str(key.src), iif=iif,
                                 ip_proto=key.proto, sport=key.sport, dport=key.dport,
                                 mark=mark, tos=tos)[0]
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

    def lookup(self, key: FlowKey) -> RouteLookup:
        """The input route lookup for ``key`` as it came in, uncached (early
        drop asks it only of tuples that keep coming)."""
        ingress = self.link(self.ingress(key).l3_iif)
        lowest = self.link(key.ifindex)
        # The MAC the frames are addressed to: the L3 device's, or for one
        # without L2 header (ppp) the Ethernet device's below it.
        mac = lowest.mac if ingress.no_l2 else ingress.mac
        try:
            msg = self.ipr.route("get", dst=str(key.dst), src=str(key.src), iif=ingress.index,
                                 ip_proto=key.proto, sport=key.sport, dport=key.dport)[0]
        except NetlinkError as exc:
            return RouteLookup(exc.code, ingress.index, mac, False)
        oif = msg.get("RTA_OIF") or 0
        learnable = msg["type"] == RTN_LOCAL or (msg["type"] == RTN_UNICAST and oif != ingress.index)
        return RouteLookup(0, ingress.index, mac, learnable)

    def _rule_facts(self) -> RuleFacts:
        try:
            rules = list(self.ipr.get_rules(family=socket.AF_INET)) + list(
                self.ipr.get_rules(family=socket.AF_INET6))
        except NetlinkError as exc:
            raise ResolveError(f"cannot read the policy rules: {exc}") from exc
        return RuleFacts.of(rules)

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

    def fdb_port(self, bridge: int, mac: bytes, vlan: int = 0) -> int:
        ck = (bridge, mac, vlan)
        if ck in self._fdb:
            return self._fdb[ck]
        port = self._fdb_lookup(bridge, mac, vlan)
        self._fdb[ck] = port
        return port

    def _fdb_lookup(self, bridge: int, mac: bytes, vlan: int) -> int:
        lladdr = ":".join(f"{b:02x}" for b in mac)
        kw: dict[str, Any] = {"vlan": vlan} if vlan else {}
        try:
            msgs = self.ipr.fdb("get", lladdr=lladdr, master=bridge, **kw)
        except NetlinkError as exc:
            raise NotYet(f"{lladdr} not in the FDB of ifindex {bridge}") from exc
        for m in msgs:
            port = m.get("ifindex") or 0
            if port and port != bridge:
                return int(port)
        raise NotYet(f"{lladdr} not in the FDB of ifindex {bridge}")

    def port_vlan_untagged(self, port: int, vid: int) -> bool:
        """Whether a VLAN-filtering bridge port sends ``vid`` untagged."""
        try:
            msgs = self.ipr.get_vlans(index=port)
        except NetlinkError:
            return True
        for m in msgs:
            if m.get("index") != port:
                continue
            spec = m.get("IFLA_AF_SPEC")
            for name, info in (spec["attrs"] if spec else []):
                if name == "IFLA_BRIDGE_VLAN_INFO" and info.get("vid") == vid:
                    return bool(info.get("flags", 0) & BRIDGE_VLAN_INFO_UNTAGGED)
        return True

    def resolve(self, key: FlowKey, dst: IPAddress, *, full: bool = True,
                mark: int = 0) -> Egress:
        """Where a packet of ``key`` goes once its destination is ``dst``;
        ``mark`` is the connection's conntrack mark.

        ``full`` (XDP): down to the lowest device, with the whole L2 header
        (VLAN tags, PPPoE, DSA tag) for the datapath to write. Otherwise (TC):
        only through plain bridges; the packet is redirected into the VLAN,
        ppp or DSA device above, whose own transmit path encapsulates it and
        whose qdisc (SQM) still sees it."""
        ingress = self.ingress(key)
        l3_oif, hop = self.route(ingress.l3_iif, key, dst, mark=mark)
        l3 = self.link(l3_oif)
        if not l3.up:
            raise ResolveError(f"{l3.name} is down")
        if l3.no_l2:  # point to point: the PPPoE step finds the peer's MAC
            header = L2Header(dmac=b"\0" * 6, smac=b"\0" * 6)
        else:
            header = L2Header(dmac=self.neighbour(l3_oif, hop), smac=l3.mac)
        path = walk_down(self, l3, header, full=full)
        dev, header = path[-1]
        if not dev.up:
            raise ResolveError(f"{dev.name} is down")
        return Egress(oif=dev.index, l2=header, mtu=_path_mtu(path), l3_oif=l3_oif, nexthop=hop)

    def close(self) -> None:
        self.ruleset.close()
        self.ipr.close()


def _link_from(msg: Any) -> Link:
    mac = msg.get("IFLA_ADDRESS") or "00:00:00:00:00:00"
    kind = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") or ""
    data = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
    vlan_id = vlan_proto = 0
    filtering = False
    if data is not None and kind == "vlan":
        vlan_id = int(data.get("IFLA_VLAN_ID") or 0)
        vlan_proto = int(data.get("IFLA_VLAN_PROTOCOL") or ETH_P_8021Q)
    if data is not None and kind == "bridge":
        filtering = bool(data.get("IFLA_BR_VLAN_FILTERING") or 0)
    return Link(
        index=msg["index"],
        name=msg.get("IFLA_IFNAME") or "",
        kind=kind,
        master=msg.get("IFLA_MASTER") or 0,
        mac=bytes.fromhex(mac.replace(":", "")) if len(mac) == 17 else b"\0" * 6,
        mtu=msg.get("IFLA_MTU") or 1500,
        up=bool(msg["flags"] & IFF_UP),
        # A veth's IFLA_LINK names its peer, in another namespace when
        # IFLA_LINK_NETNSID is there: not a lower device of ours.
        link=0 if msg.get("IFLA_LINK_NETNSID") is not None or kind == "veth"
        else (msg.get("IFLA_LINK") or 0),
        ifi_type=int(msg.get("ifi_type") or 1),
        vlan_id=vlan_id,
        vlan_proto=vlan_proto,
        vlan_filtering=filtering,
        pvid=int(data.get("IFLA_BR_VLAN_DEFAULT_PVID") or 0) if filtering and data else 0,
    )


def _path_mtu(path: list[tuple[Link, L2Header]]) -> int:
    """The largest L3 packet the path takes: the smallest MTU on the way down
    (below a PPPoE session, less its 8-byte header), and at the lowest device
    what its frame limit leaves. VLAN tags and switch tags do not count
    otherwise: a VLAN device has its lower device's MTU, and the DSA core
    raises the conduit's MTU for its tag."""
    mtu = path[0][0].mtu
    for dev, hdr in path[1:]:
        mtu = min(mtu, dev.mtu - (PPPOE_HLEN if hdr.pppoe_sid and not dev.is_ppp else 0))
    lowest, hdr = path[-1]
    beyond_eth = (dsa_tag_len(hdr.dsa_proto, tagged=bool(hdr.vlans)) + VLAN_HLEN * len(hdr.vlans)
                  + (PPPOE_HLEN if hdr.pppoe_sid else 0))
    # Only XDP writes more than one tag's worth (TC stops above VLAN, PPPoE and
    # DSA devices, whose own transmit paths check): a QinQ frame of a
    # 1500-byte packet is 1522 bytes, dropped after the redirect at MTU 1500.
    return min(mtu, lowest.mtu + XDP_L2_SLACK - beyond_eth)


def attach_points(res: Resolver, names: list[str], *, full: bool = True) -> list[AttachPoint]:
    """The devices to attach to under the interfaces the user named.

    ``full`` (XDP): the lowest devices, bridge -> ports, VLAN -> lower
    device, ppp -> the PPPoE session's Ethernet device, DSA user port ->
    conduit (marked with its tag protocol). Otherwise (TC): bridge -> ports,
    every other device itself (a ppp device marked as having no L2 header),
    so that the kernel has decapsulated the frames before the program runs."""
    return walk_attach(res, [res.link_by_name(n) for n in names], full=full)


def rt_event_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    except OSError:
        pass
    sock.bind((0, RT_GROUPS))
    sock.setblocking(False)
    return sock
