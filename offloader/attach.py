"""Attaching the datapath to devices, and putting them back as they were.

Per device and hook: XDP (native, generic) or TC clsact; with ``auto``,
native XDP where the driver has it, else TC. While XDP is attached, receive
VLAN tag stripping is turned off where a VLAN sits on the device (XDP cannot
see a stripped tag); detaching restores what was changed.

TC on a macvlan sees only the frames addressed to the macvlan's MAC. Where
its lower device answers ARP for the macvlan's addresses (Linux's default;
OpenWrt sets arp_ignore=1), peers may address the lower device instead, and
their frames bypass the hook: the agent says so, and changes no sysctl.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import bpfobj
from .config import network_devices, zone_networks
from .datapath import Datapath
from .errors import AttachError, OffloadError, ResolveError
from .routing import Link, Resolver, attach_points

log = logging.getLogger(__name__)

VLAN_PARSE_FEATURES = ("rx-vlan-hw-parse", "rx-vlan-stag-hw-parse")
IPV4_CONF = Path("/proc/sys/net/ipv4/conf")  # per network namespace


@dataclass
class Attached:
    link: Link
    hook: str  # xdp, xdpgeneric, tc, hybrid (native XDP and TC)
    restore: tuple[str, ...] = ()  # device features we turned off, to turn back on


class Attacher:
    """The devices the datapath is attached to, by ifindex."""

    def __init__(self, dp: Datapath, resolver: Resolver) -> None:
        self.dp = dp
        self.resolver = resolver
        self.attached: dict[int, Attached] = {}

    def hybrid(self) -> frozenset[int]:
        """The devices where XDP and TC are both attached."""
        return frozenset(i for i, a in self.attached.items() if a.hook == "hybrid")

    def hook_of(self, ifindex: int) -> str | None:
        att = self.attached.get(ifindex)
        return att.hook if att else None

    def report(self) -> list[dict[str, Any]]:
        """The attachments, for status."""
        return [{"name": a.link.name, "ifindex": a.link.index, "hook": a.hook}
                for a in self.attached.values()]

    def name_of(self, index: int) -> str:
        """A device's name from what is known, without a netlink query (a
        forked status child must not talk on the agent's sockets)."""
        att = self.attached.get(index)
        cached = att.link if att else self.resolver.cached_link(index)
        return cached.name if cached else str(index)

    def attach_all(self, names: list[str], hook: str) -> None:
        """Attach to ``names`` (down to what each hook needs), detach from
        devices no longer wanted."""
        if not names:
            raise OffloadError("no interfaces to offload on: give -i IFACE, set "
                               "`list interfaces` in the configuration, or define lan and wan "
                               "in /etc/config/network")
        # TC attaches above VLAN, PPPoE and DSA (the kernel decapsulates, and
        # redirecting into those devices keeps their qdiscs, i.e. SQM);
        # XDP and auto attach to the lowest devices.
        points = attach_points(self.resolver, names, full=hook != "tc")
        wanted = {p.link.index: p for p in points}
        for index in list(self.attached):
            if index not in wanted:
                self.detach(index)
        for index, point in wanted.items():
            if index not in self.attached:
                self.attached[index] = self._attach(point.link, hook)
                self.dp.add_tx_port(index)
                if self.attached[index].hook == "tc":
                    self._warn_arp_flux(point.link)
            hybrid = self.attached[index].hook == "hybrid"
            if point.dsa_proto or point.l3 or hybrid:
                self.dp.set_iface(index, point.dsa_proto, l3=point.l3, hybrid=hybrid)

    def _attach(self, link: Link, hook: str) -> Attached:
        try:  # the ruleset watcher's proof (ofl_tc_egress); without it flows just stay with the kernel
            bpfobj.tc_attach(link.index, self.dp.tc_egress, egress=True)
        except AttachError as exc:
            log.warning("%s: no TC egress probe (%s)", link.name, exc)
        if hook == "tc" or (hook == "auto" and link.kind == "veth"):
            # auto on a veth: its native XDP copies every skb its peer sends
            # into an XDP buffer, and attaching it turns TSO off on the peer
            # (a container's TCP then leaves in MTU-sized segments); TC did
            # better there on every bench figure (docs/design.md).
            bpfobj.tc_attach(link.index, self.dp.tc)
            return Attached(link, "tc")
        restore = self._show_vlan_tags_to_xdp(link)
        if hook in ("xdp", "xdpgeneric"):
            try:
                return Attached(link, bpfobj.xdp_attach(link.index, self.dp.xdp, hook), restore)
            except AttachError as exc:
                set_features(link.name, restore, True)
                if hook == "xdp" and exc.errno == errno.EOPNOTSUPP:
                    raise AttachError(f"{link.name}: its driver has no native XDP; use --hook "
                                      "auto, tc or xdpgeneric", errno=exc.errno) from exc
                raise AttachError(f"{link.name}: {exc}", errno=exc.errno) from exc
        # hybrid and auto: native XDP where the driver has it, plus TC for
        # the TCP bulk flows it hands over after GRO; else TC alone (faster
        # than generic XDP).
        try:
            mode = bpfobj.xdp_attach(link.index, self.dp.xdp, "xdp")
        except AttachError as exc:
            log.info("%s: no native XDP (%s), using TC", link.name,
                     "its driver has none" if exc.errno == errno.EOPNOTSUPP else exc)
            set_features(link.name, restore, True)
            bpfobj.tc_attach(link.index, self.dp.tc)
            return Attached(link, "tc")
        try:
            bpfobj.tc_attach(link.index, self.dp.tc)
        except AttachError as exc:
            log.info("%s: no TC (%s), XDP alone", link.name, exc)
            return Attached(link, mode, restore)
        return Attached(link, "hybrid", restore)

    def _warn_arp_flux(self, link: Link) -> None:
        if link.kind not in ("macvlan", "macvtap") or not link.lower:
            return
        with contextlib.suppress(ResolveError):
            lower = self.resolver.link(link.lower).name
            if answers_arp_for_others(lower):
                log.warning("%s: its lower device %s answers ARP for %s's addresses "
                            "(arp_ignore 0): peers that resolve the router may send to %s's "
                            "MAC, and those frames bypass the TC hook on %s (their flows stay "
                            "with the kernel); set net.ipv4.conf.%s.arp_ignore=1 (OpenWrt's "
                            "default)", link.name, lower, link.name, lower, link.name, lower)

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
        changed = set_features(link.name, VLAN_PARSE_FEATURES, False)
        if changed:
            log.info("%s: VLAN tag stripping off while XDP is attached (%s)", link.name,
                     ", ".join(changed))
        return changed

    def detach(self, index: int) -> None:
        att = self.attached.pop(index)
        try:
            bpfobj.tc_detach(index, egress=True)
        except AttachError as exc:
            log.debug("detaching the egress probe from %s: %s", att.link.name, exc)
        hooks = {"tc": ("tc",), "hybrid": ("tc", "xdp")}.get(att.hook, (att.hook,))
        for hook in hooks:
            try:
                if hook == "tc":
                    bpfobj.tc_detach(index)
                else:
                    bpfobj.xdp_detach(index, hook)
            except AttachError as exc:
                log.warning("detaching %s from %s: %s", hook, att.link.name, exc)
        set_features(att.link.name, att.restore, True)

    def zone_devices(self, zones: tuple[str, ...]) -> frozenset[int]:
        """The ifindexes of the devices of these firewall zones' networks."""
        if not zones:
            return frozenset()
        out = set()
        for name in network_devices(interfaces=zone_networks(zones=zones)):
            with contextlib.suppress(ResolveError):
                out.add(self.resolver.link_by_name(name).index)
        return frozenset(out)

    def detach_all(self) -> None:
        for index in list(self.attached):
            self.detach(index)

    def gone(self, index: int) -> None:
        """The device was deleted: nothing to detach any more."""
        self.attached.pop(index, None)


def answers_arp_for_others(dev: str, conf: Path = IPV4_CONF) -> bool:
    """Whether ``dev`` answers ARP requests for addresses of other devices:
    arp_ignore 0 (the kernel takes the larger of `all` and the device's)
    and arp_filter off (on when `all` or the device's is). Unreadable:
    assumed not (nothing to say)."""
    def value(scope: str, name: str) -> int:
        return int((conf / scope / name).read_text())

    try:
        ignore = max(value("all", "arp_ignore"), value(dev, "arp_ignore"))
        arp_filter = value("all", "arp_filter") or value(dev, "arp_filter")
    except (OSError, ValueError):
        return False
    return ignore == 0 and not arp_filter


def set_features(ifname: str, names: Iterable[str], enable: bool) -> tuple[str, ...]:
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
