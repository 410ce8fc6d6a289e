"""The device stack: each kind of device, described once.

A router's logical interfaces sit on stacks of devices (a bridge over switch
ports over a conduit, PPPoE over a VLAN over a switch port, a macvlan over an
Ethernet device). Each kind below says, in one place:

  - ``down``: how a packet goes one device down on egress, and the part of
    the L2 header that device adds (XDP writes the whole header itself; TC
    only passes plain bridges and lets the kernel encapsulate);
  - ``up``: which device of its kind on top of a device takes a received
    frame, by what is left of the frame's tags (ingress to L3 device);
  - ``attach``: what a hook attaches to for a device of that kind.

The three walks (`walk_down`, `walk_up`, `walk_attach`) only loop over these
descriptions. The facts they need (links, FDB, sysfs, PPPoE sessions) come
from a `Facts` provider: `offloader.routing.Resolver`, or a fake in tests.

    kind           down (egress)                       up (ingress)
    bridge         FDB port of the destination MAC     a port's frames: the bridge
    VLAN           the lower device, plus its tag      a tag with its id: the VLAN device
    macvlan        the lower device                    untagged, sole macvlan: the macvlan
    PPPoE (ppp)    the session's Ethernet device       the session's ppp device
    L3 (tun, ...)  none: no L2 header to write         -
    DSA user port  the conduit, plus the switch tag    its switch port: the user port
    Ethernet       none: the lowest device             -
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from pyroute2.arp import (
    ARPHRD_IPGRE,
    ARPHRD_NONE,
    ARPHRD_PIMREG,
    ARPHRD_PPP,
    ARPHRD_SIT,
    ARPHRD_TUNNEL,
    ARPHRD_TUNNEL6,
    ARPHRD_VOID,
)
from pyroute2.protocols import ETH_P_8021Q

from .datapath import DSA_PROTOS, L2Header
from .errors import ResolveError
from .pppoe import Session

log = logging.getLogger(__name__)

# Link types the kernel's __bpf_redirect() treats as having no MAC header
# (dev_is_mac_header_xmit() in include/linux/if_arp.h). pyroute2 lacks two.
ARPHRD_RAWIP = 519
ARPHRD_IP6GRE = 823
NO_MAC_HEADER: frozenset[int] = frozenset((ARPHRD_PPP, ARPHRD_NONE, ARPHRD_RAWIP, ARPHRD_TUNNEL, ARPHRD_TUNNEL6,
                           ARPHRD_SIT, ARPHRD_IPGRE, ARPHRD_IP6GRE, ARPHRD_PIMREG, ARPHRD_VOID))
MAX_TAGS = 2  # VLAN tags the datapath writes
MAX_DEPTH = 8  # devices a walk passes at most: bridge, two VLANs, PPPoE, DSA and some slack


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
        return bool(self.ifi_type == ARPHRD_PPP)

    @property
    def no_l2(self) -> bool:
        """No MAC header (ppp, tun, IP tunnels): packets start with IP."""
        return self.ifi_type in NO_MAC_HEADER

    @property
    def lower(self) -> int:
        """The lower device (IFLA_LINK), 0 if none or itself."""
        return self.link if self.link != self.index else 0


class Facts(Protocol):
    """What the walks ask about the system (answered by the Resolver)."""

    def link(self, index: int) -> Link: ...
    def links(self) -> list[Link]: ...
    def link_by_name(self, name: str) -> Link: ...
    def fdb_port(self, bridge: int, mac: bytes, vlan: int = 0) -> int: ...
    def port_vlan_untagged(self, port: int, vid: int) -> bool: ...
    def dsa_tagging(self, conduit: Link) -> int: ...
    def dsa_port(self, dev: Link) -> int | None: ...
    def pppoe_session(self, ppp: Link) -> Session | None: ...
    def ppp_of(self, sid: int, dev: Link) -> Link | None: ...
    def addressed(self, dev: Link) -> bool: ...


@dataclass(frozen=True, slots=True)
class Rx:
    """What of a received frame the walk up has still to account for."""

    dsa_port: int | None = None  # the switch port in its DSA tag
    tags: tuple[int, ...] = ()  # VLAN ids, outermost first
    pppoe_sid: int = 0
    bridge_vid: int = 0  # the VLAN a VLAN-filtering bridge put the frame in

    @property
    def bare(self) -> bool:
        return (self.dsa_port is None and not self.tags and not self.pppoe_sid
                and not self.bridge_vid)


@dataclass(frozen=True, slots=True)
class AttachPoint:
    link: Link
    dsa_proto: int = 0  # its frames carry DSA tags of this protocol
    l3: bool = False  # no L2 header (ppp): TC only
    tagged: bool = False  # its frames carry VLAN tags an upper device takes: XDP must see them


Step = tuple[Link, L2Header]
Up = tuple[Link, Rx]
# attach: where to attach for this device, or the devices to look at instead
Attach = AttachPoint | list[Link]


class Kind:
    """One kind of device. Subclasses describe theirs; a method that does not
    apply answers None (down, up) or attaches to the device itself."""

    name = "ethernet"

    def is_kind(self, facts: Facts, dev: Link) -> bool:
        return True

    def down(self, facts: Facts, dev: Link, hdr: L2Header, *, full: bool) -> Step | None:
        """One device down from ``dev`` on egress, with the header part it adds."""
        return None

    def up(self, facts: Facts, dev: Link, rx: Rx) -> Up | None:
        """The device of this kind on top of ``dev`` that takes the frame."""
        return None

    def attach(self, facts: Facts, dev: Link, *, full: bool) -> Attach:
        return AttachPoint(dev, l3=dev.no_l2, tagged=_carries_tags(facts, dev))


def _uppers(facts: Facts, dev: Link, pred: Callable[[Link], bool]) -> list[Link]:
    return [d for d in facts.links() if d.lower == dev.index and pred(d)]


def _filtering_bridge(facts: Facts, index: int) -> Link | None:
    if not index:
        return None
    dev = facts.link(index)
    return dev if dev.kind == "bridge" and dev.vlan_filtering else None


def _carries_tags(facts: Facts, dev: Link) -> bool:
    """Frames on ``dev`` carry VLAN tags that an upper device takes (VLAN
    devices on top, or a VLAN-filtering bridge above the port)."""
    return (_filtering_bridge(facts, dev.master) is not None
            or bool(_uppers(facts, dev, lambda d: d.kind == "vlan")))


class Bridge(Kind):
    """Down: the port the FDB has the destination MAC on (a VLAN-filtering
    bridge looks up in the frame's VLAN and tags it unless the port sends the
    VLAN untagged). Up (the bridge-port role): a port's frames go to its
    bridge; a VLAN-filtering bridge puts them in their tag's VLAN, or its PVID."""

    name = "bridge"

    def is_kind(self, facts: Facts, dev: Link) -> bool:
        return dev.kind == "bridge"

    def down(self, facts: Facts, dev: Link, hdr: L2Header, *, full: bool) -> Step | None:
        if not dev.vlan_filtering:
            return facts.link(facts.fdb_port(dev.index, hdr.dmac)), hdr
        if not full:  # TC redirects into the bridge, which tags the frame itself
            return None
        return self.port_for(facts, dev, hdr, dev.pvid, ETH_P_8021Q)

    @staticmethod
    def port_for(facts: Facts, bridge: Link, hdr: L2Header, vid: int, tpid: int) -> Step:
        port = facts.link(facts.fdb_port(bridge.index, hdr.dmac, vid))
        if vid and not facts.port_vlan_untagged(port.index, vid):
            hdr = replace(hdr, vlans=((tpid, vid), *hdr.vlans))
        return port, hdr

    def up(self, facts: Facts, dev: Link, rx: Rx) -> Up | None:
        if rx.dsa_port is not None or not dev.master:
            return None
        bridge = facts.link(dev.master)
        if bridge.kind != "bridge":
            return None
        vid = (rx.tags[0] if rx.tags else bridge.pvid) if bridge.vlan_filtering else 0
        return bridge, replace(rx, tags=(), bridge_vid=vid)

    def attach(self, facts: Facts, dev: Link, *, full: bool) -> Attach:
        return [p for p in facts.links() if p.master == dev.index]


class Vlan(Kind):
    """Down (XDP): the lower device, with the VLAN's tag outside the ones added
    above it; over a VLAN-filtering bridge, the bridge's port for that VLAN.
    Up: the VLAN device with the frame's outer tag on the device it arrived
    on (missing: refused), or a VLAN-filtering bridge's VLAN device for the
    frame's VLAN (missing: the bridge itself). TC attaches to it; XDP to the
    lower device."""

    name = "vlan"

    def is_kind(self, facts: Facts, dev: Link) -> bool:
        return dev.kind == "vlan" and bool(dev.lower)

    def down(self, facts: Facts, dev: Link, hdr: L2Header, *, full: bool) -> Step | None:
        if not full:
            return None
        tpid = dev.vlan_proto or ETH_P_8021Q
        bridge = _filtering_bridge(facts, dev.lower)
        if bridge is not None:
            return Bridge.port_for(facts, bridge, hdr, dev.vlan_id, tpid)
        if len(hdr.vlans) >= MAX_TAGS:
            raise ResolveError(f"{dev.name}: more than two VLAN tags")
        return facts.link(dev.lower), replace(hdr, vlans=((tpid, dev.vlan_id), *hdr.vlans))

    def up(self, facts: Facts, dev: Link, rx: Rx) -> Up | None:
        if rx.dsa_port is not None:
            return None
        if rx.tags:
            if _filtering_bridge(facts, dev.master) is not None:
                return None  # the bridge takes the tag
            vid = rx.tags[0]
            found = _uppers(facts, dev, lambda d: d.kind == "vlan" and d.vlan_id == vid)
            if not found:
                raise ResolveError(f"no VLAN {vid} device on {dev.name}")
            return found[0], replace(rx, tags=rx.tags[1:])
        if rx.bridge_vid and dev.kind == "bridge":
            vid = rx.bridge_vid
            found = _uppers(facts, dev, lambda d: d.kind == "vlan" and d.vlan_id == vid)
            return (found[0], replace(rx, bridge_vid=0)) if found else None
        return None

    def attach(self, facts: Facts, dev: Link, *, full: bool) -> Attach:
        return [facts.link(dev.lower)] if full else super().attach(facts, dev, full=full)


class Macvlan(Kind):
    """Down (XDP): the lower device; the source MAC is already the macvlan's.
    Up: the flow key has no destination MAC, so a bare frame on a device with
    exactly one macvlan on top and no address of its own is the macvlan's
    (the usual WAN setup); otherwise the lower device's."""

    name = "macvlan"

    def is_kind(self, facts: Facts, dev: Link) -> bool:
        return dev.kind in ("macvlan", "macvtap") and bool(dev.lower)

    def down(self, facts: Facts, dev: Link, hdr: L2Header, *, full: bool) -> Step | None:
        return (facts.link(dev.lower), hdr) if full else None

    def up(self, facts: Facts, dev: Link, rx: Rx) -> Up | None:
        if not rx.bare:
            return None
        found = _uppers(facts, dev, lambda d: self.is_kind(facts, d))
        if len(found) != 1 or facts.addressed(dev):
            return None
        return found[0], rx

    def attach(self, facts: Facts, dev: Link, *, full: bool) -> Attach:
        return [facts.link(dev.lower)] if full else super().attach(facts, dev, full=full)


class Pppoe(Kind):
    """A ppp device. Down (XDP): its PPPoE session's Ethernet device, with the
    session id and the access concentrator's MAC (the session unknown:
    refused). Up: the ppp device of the frame's session on the device it
    arrived on. TC attaches to the ppp device itself (no L2 header)."""

    name = "pppoe"

    def is_kind(self, facts: Facts, dev: Link) -> bool:
        return dev.is_ppp

    def down(self, facts: Facts, dev: Link, hdr: L2Header, *, full: bool) -> Step | None:
        if not full:
            return None
        session = facts.pppoe_session(dev)
        if session is None:
            raise ResolveError(f"cannot tell which PPPoE session {dev.name} carries")
        eth = facts.link_by_name(session.device)
        return eth, replace(hdr, dmac=session.peer, smac=eth.mac, pppoe_sid=session.sid)

    def up(self, facts: Facts, dev: Link, rx: Rx) -> Up | None:
        if not rx.pppoe_sid or rx.tags or rx.dsa_port is not None:
            return None
        ppp = facts.ppp_of(rx.pppoe_sid, dev)
        if ppp is None:
            raise ResolveError(f"no ppp device for PPPoE session {rx.pppoe_sid} on {dev.name}")
        return ppp, replace(rx, pppoe_sid=0)

    def attach(self, facts: Facts, dev: Link, *, full: bool) -> Attach:
        if not full:
            return super().attach(facts, dev, full=full)
        session = facts.pppoe_session(dev)
        if session is None:
            # Several sessions and no ip-up record: its flows stay with the
            # kernel rather than the agent refusing to start.
            log.warning("%s: cannot tell which PPPoE session it carries; not offloaded", dev.name)
            return []
        return [facts.link_by_name(session.device)]


class L3Device(Kind):
    """A device without a MAC header other than ppp (tun, WireGuard, IP
    tunnels). Down: nothing the datapath can write; its flows stay with the
    kernel. Hooks attach to it marked as having no L2 header."""

    name = "l3"

    def is_kind(self, facts: Facts, dev: Link) -> bool:
        return dev.no_l2

    def down(self, facts: Facts, dev: Link, hdr: L2Header, *, full: bool) -> Step | None:
        raise ResolveError(f"{dev.name} has no L2 header; not offloaded into it")


class DsaUserPort(Kind):
    """A switch port whose lower device is a DSA conduit. Down (XDP): the
    conduit, with the switch's tag for the port (a tag protocol the datapath
    does not write: refused). Up: the user port whose switch port the frame's
    tag names. XDP attaches to the conduit, marked with its tag protocol; TC
    to the user port."""

    name = "dsa"

    def is_kind(self, facts: Facts, dev: Link) -> bool:
        return (dev.kind in ("", "dsa") and bool(dev.lower)
                and facts.dsa_tagging(facts.link(dev.lower)) != 0)

    def down(self, facts: Facts, dev: Link, hdr: L2Header, *, full: bool) -> Step | None:
        if not full or hdr.dsa_proto:
            return None
        conduit = facts.link(dev.lower)
        proto = facts.dsa_tagging(conduit)
        port = facts.dsa_port(dev)
        if proto < 0 or port is None:
            raise ResolveError(f"{dev.name}: DSA tag protocol not supported by the datapath")
        return conduit, replace(hdr, dsa_proto=proto, dsa_port=port)

    def up(self, facts: Facts, dev: Link, rx: Rx) -> Up | None:
        if rx.dsa_port is None:
            return None
        port = rx.dsa_port
        found = _uppers(facts, dev, lambda d: facts.dsa_port(d) == port)
        if not found:
            raise ResolveError(f"no DSA user port {port} on {dev.name}")
        return found[0], replace(rx, dsa_port=None)

    def attach(self, facts: Facts, dev: Link, *, full: bool) -> Attach:
        if not full:
            return super().attach(facts, dev, full=full)
        conduit = facts.link(dev.lower)
        return AttachPoint(conduit, dsa_proto=max(0, facts.dsa_tagging(conduit)),
                           tagged=_carries_tags(facts, conduit))


ETHERNET = Kind()
# Which kind a device is: the first that recognises it (Ethernet otherwise).
KINDS: tuple[Kind, ...] = (Bridge(), Vlan(), Macvlan(), Pppoe(), L3Device(), DsaUserPort())
# The order in which the walk up peels a frame: switch tag, VLAN tags, bare
# frames on a macvlan's lower device, PPPoE session, bridge (and its VLAN).
UP_ORDER: tuple[Kind, ...] = tuple(
    k for name in ("dsa", "vlan", "macvlan", "pppoe", "bridge") for k in KINDS if k.name == name)


def kind_of(facts: Facts, dev: Link) -> Kind:
    return next((k for k in KINDS if k.is_kind(facts, dev)), ETHERNET)


def walk_down(facts: Facts, dev: Link, hdr: L2Header, *, full: bool) -> list[Step]:
    """The devices from ``dev`` down (``dev`` first), each with the header
    built so far."""
    path = [(dev, hdr)]
    for _ in range(MAX_DEPTH):
        step = kind_of(facts, dev).down(facts, dev, hdr, full=full)
        if step is None:
            break
        dev, hdr = step
        path.append(step)
    return path


def walk_up(facts: Facts, dev: Link, rx: Rx) -> Link:
    """The device a frame received on ``dev`` reaches at L3."""
    for _ in range(MAX_DEPTH):
        step = next((s for s in (k.up(facts, dev, rx) for k in UP_ORDER) if s is not None), None)
        if step is None:
            break
        dev, rx = step
    return dev


def walk_attach(facts: Facts, devs: list[Link], *, full: bool) -> list[AttachPoint]:
    """Where hooks attach for the devices ``devs`` (the user's interfaces)."""
    out: dict[int, AttachPoint] = {}
    todo = list(devs)
    for _ in range(64):  # bounded walk
        if not todo:
            break
        dev = todo.pop()
        where = kind_of(facts, dev).attach(facts, dev, full=full)
        if isinstance(where, list):
            todo.extend(where)
        elif where.dsa_proto:  # a conduit's tag protocol wins over a plain attach
            out[where.link.index] = where
        else:
            out.setdefault(where.link.index, where)
    return list(out.values())


# Bytes a switch tag adds to a frame on the conduit, for an untagged and for
# an 802.1Q/802.1ad-tagged frame, after the taggers' xmit in net/dsa/:
# tag_mtk.c mtk_tag_xmit() pushes its 4-byte tag only on untagged frames (on a
# tagged one it overwrites the outer TPID); tag_qca.c qca_tag_xmit() always
# pushes 2 bytes; tag_gswip.c gswip_tag_xmit() always pushes 4.
DSA_TAG_LEN = {"mtk": (4, 0), "qca": (2, 2), "gswip": (4, 4)}


def dsa_tag_len(proto: int, *, tagged: bool) -> int:
    """Bytes the DSA tag of protocol ``proto`` (a DSA_PROTOS value) adds."""
    for name, value in DSA_PROTOS.items():
        if value == proto and name in DSA_TAG_LEN:
            return DSA_TAG_LEN[name][tagged]
    return 0
