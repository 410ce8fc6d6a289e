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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import pppoe
from .datapath import DSA_PROTOS, FlowKey, L2Header
from .errors import ResolveError

log = logging.getLogger(__name__)

RTN_UNICAST = 1
ARPHRD_PPP = 512
ETH_P_8021Q = 0x8100
SYSFS_NET = Path("/sys/class/net")
NUD_VALID = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # REACHABLE STALE DELAY PROBE NOARP PERMANENT
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
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
RTM_F_CLONED = 0x200  # a route cache entry

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
    link: int  # IFLA_LINK: lower device of a VLAN or DSA user port, 0 if none
    ifi_type: int = 1  # ARPHRD_*: 1 Ethernet, 512 PPP
    vlan_id: int = 0  # a VLAN device's id
    vlan_proto: int = 0  # a VLAN device's TPID (0x8100, 0x88a8)
    vlan_filtering: bool = False  # a bridge that filters by VLAN
    pvid: int = 0  # a VLAN-filtering bridge's own (untagged) VLAN

    @property
    def is_ppp(self) -> bool:
        return self.ifi_type == ARPHRD_PPP


@dataclass(frozen=True, slots=True)
class Egress:
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


# A lower step takes the device reached so far and the L2 header built so far
# and returns the device one level down with the header it adds, or None when
# the device is not of its kind. Order: bridge, VLAN, PPPoE, DSA.
LowerStep = Callable[["Resolver", Link, L2Header], "tuple[Link, L2Header] | None"]


class Resolver:
    def __init__(self, ipr: IPRoute | None = None, *, sysfs: Path = SYSFS_NET,
                 pppoe_proc: Path = pppoe.PROC, pppoe_run: Path = pppoe.RUN_DIR) -> None:
        self.ipr = ipr or IPRoute()
        self.sysfs = sysfs
        self.pppoe_proc = pppoe_proc
        self.pppoe_run = pppoe_run
        self._links: dict[int, Link] = {}
        self._all: list[Link] | None = None
        self._routes: dict[tuple[Any, ...], tuple[int, IPAddress]] = {}
        self._neigh: dict[tuple[int, IPAddress], bytes] = {}
        self._fdb: dict[tuple[int, bytes, int], int] = {}
        self._addressed: dict[int, bool] = {}  # device has IP addresses (macvlan ingress)
        self._port_rules: bool | None = None
        self.lower_steps: list[LowerStep] = [_bridge_step, _vlan_step, _macvlan_step, _pppoe_step,
                                             _dsa_step]

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
            self._port_rules = None
            self._addressed.clear()
        if neigh:
            self._neigh.clear()
            self._fdb.clear()

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

    # -- the walk up (ingress) ----------------------------------------------------------
    def ingress(self, key: FlowKey) -> Ingress:
        """The L3 device a frame with ``key``'s ingress attributes reaches:
        lowest device -> DSA user port -> VLAN device(s) -> ppp -> bridge."""
        dev = self.link(key.ifindex)
        if key.dsa_port != 0xFF:
            users = [d for d in self.links() if d.link == dev.index and d.index != dev.index
                     and self.dsa_port(d) == key.dsa_port]
            if not users:
                raise ResolveError(f"no DSA user port {key.dsa_port} on {dev.name}")
            dev = users[0]
        for vid in (key.vlan_outer, key.vlan_inner):
            if not vid:
                continue
            if dev.master and self.link(dev.master).vlan_filtering:
                break  # the bridge takes the tag; its VLAN device is the L3 one
            uppers = [d for d in self.links() if d.kind == "vlan" and d.link == dev.index
                      and d.vlan_id == vid]
            if not uppers:
                raise ResolveError(f"no VLAN {vid} device on {dev.name}")
            dev = uppers[0]
        if not key.vlan_outer and not key.pppoe_sid:
            dev = self._macvlan_upper(dev)
        if key.pppoe_sid:
            names = [d.name for d in self.links() if d.is_ppp]
            name = pppoe.ppp_of(key.pppoe_sid, dev.name, names, self.pppoe_proc, self.pppoe_run)
            if name is None:
                raise ResolveError(f"no ppp device for PPPoE session {key.pppoe_sid} on {dev.name}")
            dev = self.link_by_name(name)
        if dev.master:
            master = self.link(dev.master)
            if master.kind == "bridge":
                dev = master
                vid = key.vlan_outer or master.pvid
                if master.vlan_filtering and vid:
                    uppers = [d for d in self.links() if d.kind == "vlan"
                              and d.link == master.index and d.vlan_id == vid]
                    if uppers:
                        dev = uppers[0]
        return Ingress(dev.index)

    def _macvlan_upper(self, dev: Link) -> Link:
        """The key has no destination MAC, so a frame on a device with macvlan
        devices on top is taken as the macvlan's when there is exactly one
        and the lower device has no address of its own (the usual WAN
        setup); otherwise as the lower device's."""
        uppers = [d for d in self.links() if d.kind in ("macvlan", "macvtap")
                  and d.link == dev.index]
        if len(uppers) != 1:
            return dev
        if dev.index not in self._addressed:
            self._addressed[dev.index] = bool(self.ipr.get_addr(index=dev.index))
        return dev if self._addressed[dev.index] else uppers[0]

    # -- the walk down (egress) ------------------------------------------------------------
    def route(self, iif: int, key: FlowKey, dst: IPAddress) -> tuple[int, IPAddress]:
        """(output ifindex, next hop address) as the kernel's input route
        lookup gives them for this packet."""
        if self._port_rules is None:
            self._port_rules = self._rules_use_ports()
        # Ports only matter to the lookup when a policy rule matches on them:
        # without such rules, one lookup serves every flow between two hosts.
        ports = (key.proto, key.sport, key.dport) if self._port_rules else ()
        ck = (iif, key.src, dst, *ports)
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

    def _rules_use_ports(self) -> bool:
        try:
            rules = list(self.ipr.get_rules(family=socket.AF_INET)) + list(
                self.ipr.get_rules(family=socket.AF_INET6))
        except NetlinkError:
            return True
        return any(r.get(a) is not None for r in rules
                   for a in ("FRA_SPORT_RANGE", "FRA_DPORT_RANGE", "FRA_IP_PROTO"))

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
                    return bool(info.get("flags", 0) & 0x4)  # BRIDGE_VLAN_INFO_UNTAGGED
        return True

    def resolve(self, key: FlowKey, dst: IPAddress, *, full: bool = True) -> Egress:
        """Where a packet of ``key`` goes once its destination is ``dst``.

        ``full`` (XDP): down to the lowest device, with the whole L2 header
        (VLAN tags, PPPoE, DSA tag) for the datapath to write. Otherwise (TC):
        only through plain bridges; the packet is redirected into the VLAN,
        ppp or DSA device above, whose own transmit path encapsulates it and
        whose qdisc (SQM) still sees it."""
        ingress = self.ingress(key)
        l3_oif, hop = self.route(ingress.l3_iif, key, dst)
        l3 = self.link(l3_oif)
        if not l3.up:
            raise ResolveError(f"{l3.name} is down")
        if l3.is_ppp:  # point to point: the PPPoE step finds the peer's MAC
            header = L2Header(dmac=b"\0" * 6, smac=b"\0" * 6)
        else:
            header = L2Header(dmac=self.neighbour(l3_oif, hop), smac=l3.mac)
        dev = l3
        mtu = l3.mtu
        steps = self.lower_steps if full else [_plain_bridge_step]
        for _ in range(8):  # bounded: bridge, two VLANs, PPPoE, DSA at most
            for step in steps:
                lower = step(self, dev, header)
                if lower is not None:
                    dev, header = lower
                    mtu = min(mtu, dev.mtu - (8 if header.pppoe_sid and not dev.is_ppp else 0))
                    break
            else:
                break
        if full and len(header.vlans) > 1:
            # An XDP redirect (the kernel's xdp_ok_fwd_dev) takes a frame of at
            # most MTU + 14 + 4 bytes on the egress device: one tag's worth.
            # Every further tag in the frame costs 4 bytes of L3 packet, or
            # full-size QinQ frames are dropped after the redirect.
            mtu = min(mtu, dev.mtu - 4 * (len(header.vlans) - 1))
        if not dev.up:
            raise ResolveError(f"{dev.name} is down")
        if dev.is_ppp and full:
            raise ResolveError(f"cannot tell which PPPoE session {dev.name} carries")
        # VLAN tags and DSA tags do not lower the MTU: Linux lets a VLAN device
        # have its lower device's MTU, and the DSA core enlarges the conduit's.
        return Egress(oif=dev.index, l2=header, mtu=mtu, l3_oif=l3_oif, nexthop=hop)

    def close(self) -> None:
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
        up=bool(msg["flags"] & 1),
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


def _bridge_step(res: Resolver, dev: Link, header: L2Header) -> tuple[Link, L2Header] | None:
    """A bridge sends to the port its FDB has the destination MAC on; a
    VLAN-filtering bridge tags the frame unless the port sends the VLAN untagged."""
    if dev.kind == "vlan" and dev.link:
        lower = res.link(dev.link)
        if lower.kind == "bridge" and lower.vlan_filtering:
            port = res.link(res.fdb_port(lower.index, header.dmac, dev.vlan_id))
            if not res.port_vlan_untagged(port.index, dev.vlan_id):
                header = replace(header, vlans=((dev.vlan_proto, dev.vlan_id), *header.vlans))
            return port, header
    if dev.kind != "bridge":
        return None
    vid = dev.pvid if dev.vlan_filtering else 0
    port = res.link(res.fdb_port(dev.index, header.dmac, vid))
    if vid and not res.port_vlan_untagged(port.index, vid):
        header = replace(header, vlans=((ETH_P_8021Q, vid), *header.vlans))
    return port, header


def _plain_bridge_step(res: Resolver, dev: Link,
                       header: L2Header) -> tuple[Link, L2Header] | None:
    """TC: a bridge without VLAN filtering hands the frame to its port; a
    VLAN-filtering bridge is left to tag it itself."""
    if dev.kind != "bridge" or dev.vlan_filtering:
        return None
    return res.link(res.fdb_port(dev.index, header.dmac)), header


def _vlan_step(res: Resolver, dev: Link, header: L2Header) -> tuple[Link, L2Header] | None:
    """A VLAN device adds its tag outside the ones added above it."""
    if dev.kind != "vlan" or not dev.link:
        return None
    if len(header.vlans) >= 2:
        raise ResolveError(f"{dev.name}: more than two VLAN tags")
    tag = (dev.vlan_proto or ETH_P_8021Q, dev.vlan_id)
    return res.link(dev.link), replace(header, vlans=(tag, *header.vlans))


def _macvlan_step(res: Resolver, dev: Link, header: L2Header) -> tuple[Link, L2Header] | None:
    """A macvlan device sends out of its lower device with its own MAC (the
    header's source MAC is already the macvlan's)."""
    if dev.kind not in ("macvlan", "macvtap") or not dev.link:
        return None
    return res.link(dev.link), header


def _pppoe_step(res: Resolver, dev: Link, header: L2Header) -> tuple[Link, L2Header] | None:
    """A ppp device of a PPPoE session: session id, peer MAC, Ethernet device."""
    if not dev.is_ppp:
        return None
    session = pppoe.session_of(dev.name, res.pppoe_proc, res.pppoe_run)
    if session is None:
        raise ResolveError(f"cannot tell which PPPoE session {dev.name} carries")
    eth = res.link_by_name(session.device)
    return eth, replace(header, dmac=session.peer, smac=eth.mac, pppoe_sid=session.sid)


def _dsa_step(res: Resolver, dev: Link, header: L2Header) -> tuple[Link, L2Header] | None:
    """A DSA user port sends through its conduit with the switch's tag."""
    if not dev.link or dev.link == dev.index or header.dsa_proto or dev.kind not in ("", "dsa"):
        return None
    conduit = res.link(dev.link)
    proto = res.dsa_tagging(conduit)
    if proto == 0:
        return None
    port = res.dsa_port(dev)
    if proto < 0 or port is None:
        raise ResolveError(f"{dev.name}: DSA tag protocol not supported by the datapath")
    return conduit, replace(header, dsa_proto=proto, dsa_port=port)


@dataclass(frozen=True, slots=True)
class AttachPoint:
    link: Link
    dsa_proto: int = 0  # its frames carry DSA tags of this protocol
    l3: bool = False  # no L2 header (ppp): TC only


def attach_points(res: Resolver, names: list[str], *, full: bool = True) -> list[AttachPoint]:
    """The devices to attach to under the interfaces the user named.

    ``full`` (XDP): the lowest devices, bridge -> ports, VLAN -> lower
    device, ppp -> the PPPoE session's Ethernet device, DSA user port ->
    conduit (marked with its tag protocol). Otherwise (TC): bridge -> ports,
    every other device itself (a ppp device marked as having no L2 header),
    so that the kernel has decapsulated the frames before the program runs."""
    out: dict[int, AttachPoint] = {}
    todo = [res.link_by_name(n) for n in names]
    for _ in range(64):  # bounded walk
        if not todo:
            break
        dev = todo.pop()
        if dev.kind == "bridge":
            todo.extend(p for p in res.links() if p.master == dev.index)
        elif not full:
            out.setdefault(dev.index, AttachPoint(dev, l3=dev.is_ppp))
        elif dev.kind in ("vlan", "macvlan", "macvtap") and dev.link:
            todo.append(res.link(dev.link))
        elif dev.is_ppp:
            session = pppoe.session_of(dev.name, res.pppoe_proc, res.pppoe_run)
            if session is None:
                # Several sessions and no ip-up record: its flows stay with the
                # kernel rather than the agent refusing to start.
                log.warning("%s: cannot tell which PPPoE session it carries; not offloaded",
                            dev.name)
                continue
            todo.append(res.link_by_name(session.device))
        elif (dev.kind in ("", "dsa") and dev.link and dev.link != dev.index
              and res.dsa_tagging(res.link(dev.link))):
            conduit = res.link(dev.link)
            out[conduit.index] = AttachPoint(conduit, dsa_proto=max(0, res.dsa_tagging(conduit)))
        else:
            out.setdefault(dev.index, AttachPoint(dev))
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
