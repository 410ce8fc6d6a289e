"""The datapath as the agent sees it: the loaded object, its maps, and the
typed flow keys and verdicts that go in and out of them.

Layouts come from bpf/offload.h through :mod:`offloader.layout`; this module
only fills fields by name.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import os
import shutil
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import csum
from .bpfobj import BPF_ANY, BPF_NOEXIST, BpfObject, Map, Program, is_bpffs, make_pin_dir
from .errors import MapError, ObjectLoadError, OffloadError
from .layout import Layout, layout, object_stamp, stamp_name

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Switch tag protocols the datapath parses, by sysfs dsa/tagging name ("mtk",
# "qca", ...; "none" is 0), and the key's "no DSA port", both from the header.
DSA_PROTOS = layout().dsa_protos()
DSA_PORT_NONE = layout().const("OFL_DSA_PORT_NONE")
MAP_NAMES = ("ofl_flows", "ofl_pending", "ofl_events", "ofl_tx_ports", "ofl_ifaces", "ofl_config",
             "ofl_stats", "ofl_drops", "ofl_probes")
OBJECT_SEARCH = (
    "/lib/bpf/ebpf-offloader.o",
    "/usr/lib/ebpf-offloader/offload.bpf.o",
    str(Path(__file__).resolve().parent / "offload.bpf.o"),  # in a wheel (setup.py builds it)
    str(Path(__file__).resolve().parent.parent / "build" / "offload.bpf.o"),
)


def find_object(explicit: str = "") -> str:
    """The BPF object to load: ``explicit``, $EBPF_OFFLOADER_OBJECT, or the
    first default location that exists."""
    for candidate in (explicit, os.environ.get("EBPF_OFFLOADER_OBJECT", ""), *OBJECT_SEARCH):
        if candidate and Path(candidate).is_file():
            return candidate
        if candidate and candidate == explicit:
            raise OffloadError(f"BPF object {explicit} does not exist")
    raise OffloadError("BPF object not found: build it (cmake -S . -B build && cmake --build build)"
                       " or point at it with --object PATH or EBPF_OFFLOADER_OBJECT=PATH;"
                       f" looked in {', '.join(OBJECT_SEARCH)}")


def _ip_words(addr: IPAddress) -> bytes:
    """Address as it sits in a key: 16 bytes, IPv4 in the first four."""
    return addr.packed.ljust(16, b"\0")


def _ip_from(raw: bytes, family: int) -> IPAddress:
    if family == socket.AF_INET:
        return ipaddress.IPv4Address(raw[:4])
    return ipaddress.IPv6Address(raw[:16])


@functools.cache
def _key_struct() -> struct.Struct:
    """struct ofl_key as a struct.Struct, offsets from the header through
    cffi (host order, padding zero): a key is packed and unpacked for every
    new tuple, and cffi field by field cost ten times more."""
    ffi = layout().ffi
    fields = [("ifindex", "I"), ("vlan_outer", "H"), ("vlan_inner", "H"), ("pppoe_sid", "H"),
              ("dsa_port", "B"), ("family", "B"), ("proto", "B"), ("sport", "H"), ("dport", "H"),
              ("saddr", "16s"), ("daddr", "16s")]
    named = {n for n, _ in ffi.typeof("struct ofl_key").fields} - {"pad"}
    if named != {n for n, _ in fields}:
        raise OffloadError(f"struct ofl_key has fields {sorted(named)}: FlowKey must follow")
    fmt, pos = "=", 0
    for name, code in sorted(fields, key=lambda f: ffi.offsetof("struct ofl_key", f[0])):
        offset = ffi.offsetof("struct ofl_key", name)
        fmt += f"{offset - pos}x{code}" if offset > pos else code
        pos = offset + struct.calcsize("=" + code)
    size = ffi.sizeof("struct ofl_key")
    fmt += f"{size - pos}x" if size > pos else ""
    out = struct.Struct(fmt)
    if out.size != size:
        raise OffloadError(f"struct ofl_key is {size} bytes, its fields give {out.size}")
    return out


def _be16(value: int) -> int:
    """A host value for a __be16 field whose memory must read ``value`` big-endian."""
    return socket.htons(value & 0xFFFF)


@dataclass(frozen=True, slots=True)
class FlowKey:
    """One direction of one connection, as the datapath keys it."""

    ifindex: int
    family: int  # socket.AF_INET / AF_INET6
    proto: int  # socket.IPPROTO_TCP / IPPROTO_UDP
    src: IPAddress
    dst: IPAddress
    sport: int
    dport: int
    vlan_outer: int = 0
    vlan_inner: int = 0
    pppoe_sid: int = 0
    dsa_port: int = DSA_PORT_NONE

    def pack(self) -> bytes:
        return _key_struct().pack(
            self.ifindex, self.vlan_outer, self.vlan_inner, self.pppoe_sid, self.dsa_port,
            self.family, self.proto, socket.htons(self.sport), socket.htons(self.dport),
            _ip_words(self.src), _ip_words(self.dst))

    @classmethod
    def unpack(cls, raw: bytes) -> FlowKey:
        (ifindex, vlan_outer, vlan_inner, pppoe_sid, dsa_port, family, proto, sport, dport, saddr,
         daddr) = _key_struct().unpack(raw)
        return cls(ifindex=ifindex, family=family, proto=proto, src=_ip_from(saddr, family),
                   dst=_ip_from(daddr, family), sport=socket.ntohs(sport),
                   dport=socket.ntohs(dport), vlan_outer=vlan_outer, vlan_inner=vlan_inner,
                   pppoe_sid=pppoe_sid, dsa_port=dsa_port)

    def replace(self, **changes: Any) -> FlowKey:
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(changes)
        return FlowKey(**values)


@dataclass(frozen=True, slots=True)
class L2Header:
    """The L2 header a verdict writes on the way out (outermost tag first)."""

    dmac: bytes
    smac: bytes
    vlans: tuple[tuple[int, int], ...] = ()  # (TPID, TCI) pairs
    pppoe_sid: int = 0
    dsa_proto: int = 0  # DSA_PROTOS value
    dsa_port: int = 0


@dataclass(frozen=True, slots=True)
class Verdict:
    """Where and how to forward one direction of a flow."""

    oif: int
    l2: L2Header
    mtu: int
    key: FlowKey  # the tuple before NAT (for the checksum deltas)
    nat_src: IPAddress | None = None
    nat_dst: IPAddress | None = None
    nat_sport: int | None = None
    nat_dport: int | None = None
    reply: bool = False  # the key is conntrack's reply direction
    zone: int = 0  # conntrack zone
    mark: int = 0  # conntrack mark the route was looked up with
    assured: bool = False  # conntrack had the entry assured (its timeout class)
    young: bool = False  # conntrack's own timeout not yet renewed (OFL_V_YOUNG)

    def pack(self, state: int | None = None, last_seen_ns: int = 0) -> bytes:
        """The ofl_flow value: verdict, zero counters, ``state``, last seen."""
        lay = layout()
        f = lay.new("struct ofl_flow")
        v = f.v
        v.oif = self.oif
        v.mtu = self.mtu
        lay.ffi.memmove(v.dmac, self.l2.dmac, 6)
        lay.ffi.memmove(v.smac, self.l2.smac, 6)
        if len(self.l2.vlans) > 2:
            raise OffloadError("at most two VLAN tags")
        for i, (tpid, tci) in enumerate(self.l2.vlans):
            v.vlan_proto[i] = _be16(tpid)
            v.vlan_tci[i] = _be16(tci)
        v.pppoe_sid = self.l2.pppoe_sid
        v.dsa_proto = self.l2.dsa_proto
        v.dsa_port = self.l2.dsa_port
        flags = 0
        k = self.key
        new_src = self.nat_src or k.src
        new_dst = self.nat_dst or k.dst
        new_sport = k.sport if self.nat_sport is None else self.nat_sport
        new_dport = k.dport if self.nat_dport is None else self.nat_dport
        if new_src != k.src:
            flags |= lay.const("OFL_V_SNAT")
            lay.ffi.memmove(v.nat_saddr, _ip_words(new_src), 16)
        if new_dst != k.dst:
            flags |= lay.const("OFL_V_DNAT")
            lay.ffi.memmove(v.nat_daddr, _ip_words(new_dst), 16)
        if new_sport != k.sport:
            flags |= lay.const("OFL_V_SPORT")
            v.nat_sport = socket.htons(new_sport)
        if new_dport != k.dport:
            flags |= lay.const("OFL_V_DPORT")
            v.nat_dport = socket.htons(new_dport)
        if self.reply:
            flags |= lay.const("OFL_V_REPLY")
        if self.assured:
            flags |= lay.const("OFL_V_ASSURED")
        if self.young:
            flags |= lay.const("OFL_V_YOUNG")
        v.flags = flags
        v.ct_zone = self.zone
        v.ct_mark = self.mark
        addr_delta = csum.delta(k.src.packed + k.dst.packed, new_src.packed + new_dst.packed)
        port_delta = csum.delta(
            k.sport.to_bytes(2, "big") + k.dport.to_bytes(2, "big"),
            new_sport.to_bytes(2, "big") + new_dport.to_bytes(2, "big"),
        )
        v.csum_l3 = _be16(addr_delta if k.family == socket.AF_INET else 0)
        v.csum_l4_addr = _be16(addr_delta)
        v.csum_l4_port = _be16(port_delta)
        f.state = lay.const("OFL_STATE_OFFLOAD") if state is None else state
        f.last_seen_ns = last_seen_ns
        return lay.to_bytes(f)

    @classmethod
    def unpack(cls, key: FlowKey, raw_flow: bytes) -> Verdict:
        """The verdict an ofl_flow value of ``key`` holds (``pack``'s inverse
        for the verdict; the hybrid hook's OFL_V_TC flag is not part of it)."""
        lay = layout()
        f = lay.from_bytes("struct ofl_flow", raw_flow)  # owns the memory v points into
        v = f.v
        ffi = lay.ffi
        tags = tuple((socket.ntohs(v.vlan_proto[i]), socket.ntohs(v.vlan_tci[i]))
                     for i in range(2) if v.vlan_proto[i])
        l2 = L2Header(dmac=bytes(ffi.buffer(v.dmac, 6)), smac=bytes(ffi.buffer(v.smac, 6)),
                      vlans=tags, pppoe_sid=v.pppoe_sid, dsa_proto=v.dsa_proto,
                      dsa_port=v.dsa_port)
        flags = v.flags
        return cls(
            oif=v.oif, l2=l2, mtu=v.mtu, key=key,
            nat_src=_ip_from(bytes(ffi.buffer(v.nat_saddr, 16)), key.family)
            if flags & lay.const("OFL_V_SNAT") else None,
            nat_dst=_ip_from(bytes(ffi.buffer(v.nat_daddr, 16)), key.family)
            if flags & lay.const("OFL_V_DNAT") else None,
            nat_sport=socket.ntohs(v.nat_sport) if flags & lay.const("OFL_V_SPORT") else None,
            nat_dport=socket.ntohs(v.nat_dport) if flags & lay.const("OFL_V_DPORT") else None,
            reply=bool(flags & lay.const("OFL_V_REPLY")), zone=v.ct_zone, mark=v.ct_mark,
            assured=bool(flags & lay.const("OFL_V_ASSURED")),
            young=bool(flags & lay.const("OFL_V_YOUNG")))


@dataclass(frozen=True, slots=True)
class FlowEntry:
    """A row of the flow map as read back."""

    key: FlowKey
    state: int
    packets: int
    nbytes: int
    last_seen_ns: int
    seen: int
    oif: int
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class DropEntry:
    """A row of the early-drop map as read back."""

    key: FlowKey
    reason: int  # OFL_DROP_*
    expires_ns: int
    packets: int
    nbytes: int


def flow_entry(raw_key: bytes, raw_val: bytes) -> FlowEntry:
    """A flow map row read back from its raw key and value."""
    f = layout().from_bytes("struct ofl_flow", raw_val)
    return FlowEntry(FlowKey.unpack(raw_key), f.state, f.packets, f.bytes, f.last_seen_ns, f.seen,
                     f.v.oif, raw_val)


def probe_key(key: FlowKey, raw_flow: bytes) -> bytes:
    """The tuple an offloaded flow's packets leave with (after its NAT), as
    the egress program keys ofl_probes: no ingress device or L2 fields."""
    lay = layout()
    flow = lay.from_bytes("struct ofl_flow", raw_flow)  # owns the memory v points into
    v = flow.v
    k = lay.from_bytes("struct ofl_key", key.pack())
    k.ifindex = 0
    k.vlan_outer = k.vlan_inner = k.pppoe_sid = 0
    k.dsa_port = DSA_PORT_NONE
    if v.flags & lay.const("OFL_V_SNAT"):
        lay.ffi.memmove(k.saddr, v.nat_saddr, 16)
    if v.flags & lay.const("OFL_V_DNAT"):
        lay.ffi.memmove(k.daddr, v.nat_daddr, 16)
    if v.flags & lay.const("OFL_V_SPORT"):
        k.sport = v.nat_sport
    if v.flags & lay.const("OFL_V_DPORT"):
        k.dport = v.nat_dport
    return lay.to_bytes(k)


def pass_value() -> bytes:
    """An ofl_flow value that says: hand this tuple to the kernel."""
    lay = layout()
    f = lay.new("struct ofl_flow")
    f.state = lay.const("OFL_STATE_PASS")
    return lay.to_bytes(f)


def check_object_layout(path: str) -> None:
    """Refuse an object built from another version of the shared header: its
    layout stamp (offload.h, OFL_LAYOUT) must equal the one cffi computes
    from ours. Checked before libbpf opens the file or anything is pinned."""
    ours = layout().stamp_table
    try:
        theirs = object_stamp(path)
    except (OSError, struct.error, ValueError) as exc:
        raise ObjectLoadError(f"{path} is not a BPF object this agent can read ({exc})") from exc
    if theirs is None:
        raise ObjectLoadError(f"{path} has no layout stamp: it is not an ebpf-offloader "
                              "datapath of this version (rebuild it: cmake --build build)")
    if theirs != ours:
        raise ObjectLoadError(f"{path} was built from another bpf/offload.h (layout "
                              f"{stamp_name(theirs)}, this agent's is {stamp_name(ours)}): "
                              "rebuild the object or install the agent of the same build")


BPFFS = Path("/sys/fs/bpf")


def in_root_netns() -> bool:
    """True in the root network namespace (the one of PID 1)."""
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return False


def netns_pin_dir(base: Path = BPFFS) -> Path | None:
    """Where this network namespace's agent pins its maps, or None.

    In the root network namespace (OpenWrt's case) it is
    /sys/fs/bpf/ebpf-offloader; in another one, a directory named after the
    namespace's inode, so two agents never share maps. None when /sys/fs/bpf
    is not a BPF filesystem (``ip netns exec`` remounts /sys). The
    directories are made root-only by bpfobj.make_pin_dir() when maps are pinned."""
    if not is_bpffs(base):
        return None
    top = base / "ebpf-offloader"
    return top if in_root_netns() else top / f"netns-{os.stat('/proc/self/ns/net').st_ino}"


class Datapath:
    """The loaded object: programs, maps and typed access to them."""

    def __init__(self, object_path: str, *, max_flows: int = 65536, pending_flows: int = 8192,
                 drop_entries: int = 4096, ring_bytes: int = 512 * 1024,
                 pin_dir: Path | None = None):
        self.layout: Layout = layout()
        self.pin_dir = pin_dir
        try:
            self.obj = self._open(object_path, max_flows, pending_flows, drop_entries, ring_bytes, pin_dir)
        except ObjectLoadError:
            if pin_dir is None or not pin_dir.exists():
                raise
            # Maps pinned by an older, incompatible build or size: start afresh.
            log.warning("pinned maps in %s do not fit this object; replacing them", pin_dir)
            shutil.rmtree(pin_dir, ignore_errors=True)
            self.obj = self._open(object_path, max_flows, pending_flows, drop_entries, ring_bytes, pin_dir)
        self.xdp: Program = self.obj.program("ofl_xdp")
        self.tc: Program = self.obj.program("ofl_tc")
        self.tc_egress: Program = self.obj.program("ofl_tc_egress")
        self.flows: Map = self.obj.map("ofl_flows")
        self.pending: Map = self.obj.map("ofl_pending")
        # Decided tuples, deleted from the pending map in one batch (settle_pending).
        self._decided: list[bytes] = []
        self.events: Map = self.obj.map("ofl_events")
        self.tx_ports: Map = self.obj.map("ofl_tx_ports")
        self.ifaces: Map = self.obj.map("ofl_ifaces")
        self.config: Map = self.obj.map("ofl_config")
        self.stats_map: Map = self.obj.map("ofl_stats")
        self.drops: Map = self.obj.map("ofl_drops")
        self.probes: Map = self.obj.map("ofl_probes")
        self.tx_known: set[int] = set()  # ports written to tx_ports (offload skips them)
        self._cfg_flags = 0
        self._heartbeat_timeout_ns = 3_000_000_000
        self._renotify_ns = 200_000_000

    @staticmethod
    def _open(path: str, max_flows: int, pending_flows: int, drop_entries: int, ring_bytes: int,
              pin_dir: Path | None) -> BpfObject:
        check_object_layout(path)
        obj = BpfObject(path)
        try:
            obj.set_max_entries("ofl_flows", max_flows)
            obj.set_max_entries("ofl_pending", pending_flows)
            obj.set_max_entries("ofl_drops", drop_entries)
            obj.set_max_entries("ofl_probes", max_flows)
            obj.set_max_entries("ofl_events", ring_bytes)
            if pin_dir is not None:
                make_pin_dir(pin_dir)
                for name in MAP_NAMES:
                    # Not the ring buffer (nothing worth keeping) nor the devmap:
                    # libbpf 1.1 refuses to re-use a pinned DEVMAP_HASH ("parameter
                    # mismatch", the kernel adds BPF_F_RDONLY_PROG); the agent
                    # refills it from the flows it adopts.
                    if name not in ("ofl_events", "ofl_tx_ports"):
                        obj.set_pin_path(name, str(pin_dir / name))
            obj.load()
        except BaseException:
            obj.close()
            raise
        return obj

    def close(self) -> None:
        self.obj.close()

    # -- settings -----------------------------------------------------------
    def configure(self, *, enabled: bool = True, heartbeat_timeout: float = 3.0,
                  renotify: float = 0.2, early_drop: bool = False) -> None:
        lay = self.layout
        flags = lay.const("OFL_CFG_ENABLED") if enabled else 0
        flags |= lay.const("OFL_CFG_DROP") if early_drop else 0
        flags |= self._cfg_flags & (lay.const("OFL_CFG_IFACES") | lay.const("OFL_CFG_PROBE"))
        self._cfg_flags = flags
        self._heartbeat_timeout_ns = int(heartbeat_timeout * 1e9)
        self._renotify_ns = int(renotify * 1e9)
        self.heartbeat()

    def heartbeat(self, now_ns: int | None = None) -> None:
        """Tell the datapath the agent is alive (CLOCK_MONOTONIC, like bpf_ktime_get_ns)."""
        lay = self.layout
        cfg = lay.new("struct ofl_config")
        cfg.heartbeat_ns = time.monotonic_ns() if now_ns is None else now_ns
        cfg.heartbeat_timeout_ns = self._heartbeat_timeout_ns
        cfg.renotify_ns = self._renotify_ns
        cfg.flags = self._cfg_flags
        self.config.update(b"\0" * 4, lay.to_bytes(cfg))

    def add_tx_port(self, ifindex: int) -> None:
        self.tx_ports.update(ifindex.to_bytes(4, "little"), ifindex.to_bytes(4, "little"))
        self.tx_known.add(ifindex)

    def forget_tx_ports(self) -> None:
        """A link changed: the kernel drops a device's devmap entry when the
        device goes, so ``offload`` writes each port again from now on."""
        self.tx_known.clear()

    def set_iface(self, ifindex: int, dsa_proto: int = 0, *, l3: bool = False,
                  hybrid: bool = False) -> None:
        """Per-device settings: the DSA tag protocol its frames carry,
        ``l3`` for a device without an L2 header (ppp; TC only), ``hybrid``
        where XDP and TC are both attached (TC leaves new tuples to XDP)."""
        lay = self.layout
        ifc = lay.new("struct ofl_iface")
        ifc.dsa_proto = dsa_proto
        ifc.flags = ((lay.const("OFL_IF_L3") if l3 else 0)
                     | (lay.const("OFL_IF_HYBRID") if hybrid else 0))
        self.ifaces.update(ifindex.to_bytes(4, "little"), lay.to_bytes(ifc))
        if dsa_proto or l3 or hybrid:
            self._cfg_flags |= lay.const("OFL_CFG_IFACES")
            self.heartbeat()

    def set_probing(self, on: bool) -> None:
        """Whether the egress program looks handed-back flows up (ofl_probes)."""
        bit = self.layout.const("OFL_CFG_PROBE")
        flags = (self._cfg_flags | bit) if on else (self._cfg_flags & ~bit)
        if flags != self._cfg_flags:
            self._cfg_flags = flags
            self.heartbeat()

    # -- early drops ----------------------------------------------------------
    def add_drop(self, key: FlowKey, reason: int, expires_ns: int, dmac: bytes) -> None:
        """Drop ``key``'s frames addressed to ``dmac`` (the router's MAC on the
        ingress L3 device; zero on a device without L2 header) in the
        datapath until ``expires_ns`` (CLOCK_MONOTONIC); the tuple stops
        being pending."""
        lay = self.layout
        d = lay.new("struct ofl_drop")
        d.expires_ns = expires_ns
        d.reason = reason
        lay.ffi.memmove(d.dmac, dmac[:6].ljust(6, b"\0"), 6)
        raw = key.pack()
        self.drops.update(raw, lay.to_bytes(d))
        # At once, not with the decided ones: a frame the drop does not
        # match (another MAC) makes a new pending entry, which a later
        # batch delete would take away.
        self.pending.delete(raw)

    def drop_entries(self) -> Iterator[DropEntry]:
        lay = self.layout
        for raw_key, raw_val in self.drops.items():
            d = lay.from_bytes("struct ofl_drop", raw_val)
            yield DropEntry(FlowKey.unpack(raw_key), d.reason, d.expires_ns, d.packets, d.bytes)

    def pending_entry(self, key: FlowKey) -> tuple[int, int] | None:
        """(first_seen_ns, packets) of a pending tuple, None if not pending."""
        self.settle_pending()
        raw = self.pending.lookup(key.pack())
        if raw is None:
            return None
        p = self.layout.from_bytes("struct ofl_pending", raw)
        return p.first_seen_ns, p.packets

    # -- egress probes ----------------------------------------------------------
    def arm_probe(self, raw_probe_key: bytes, armed_ns: int) -> None:
        """Count sightings of this leaving tuple from ``armed_ns`` on (a fresh start)."""
        p = self.layout.new("struct ofl_probe")
        p.armed_ns = armed_ns
        self.probes.update(raw_probe_key, self.layout.to_bytes(p))

    def probes_seen(self) -> Iterator[tuple[bytes, int, int]]:
        """(probe key, armed_ns, packets seen since) of every probe."""
        lay = self.layout
        for raw_key, raw_val in self.probes.items():
            p = lay.from_bytes("struct ofl_probe", raw_val)
            yield raw_key, p.armed_ns, p.packets

    # -- flows ----------------------------------------------------------------
    def offload(self, key: FlowKey, verdict: Verdict, *, replace: bool = True,
                raw: bytes | None = None) -> bool:
        """Write the verdict. With ``replace`` False, a flow offloaded
        already (a late ring record or event for it) keeps its entry,
        counters included, and False is returned; a pass entry (probation)
        is replaced either way. ``raw``: ``key`` packed, if the caller has it."""
        raw = key.pack() if raw is None else raw
        # Stamped now, so a flow that never carries a packet still idles out.
        value = verdict.pack(last_seen_ns=time.monotonic_ns())
        return self.offload_packed(raw, verdict.oif, value, replace=replace)

    def offload_packed(self, raw: bytes, oif: int, value: bytes, *, replace: bool = True) -> bool:
        """``offload`` with the key and the ofl_flow value (to ``oif``) packed already."""
        if oif not in self.tx_known:
            self.add_tx_port(oif)
        try:
            self.flows.update(raw, value, BPF_ANY if replace else BPF_NOEXIST)
        except MapError as exc:
            if exc.errno != errno.EEXIST:
                raise
            current = self.flows.lookup(raw)
            if current is not None and self.layout.from_bytes(
                    "struct ofl_flow", current).state == self.layout.const("OFL_STATE_OFFLOAD"):
                self._decided.append(raw)
                return False
            self.flows.update(raw, value)
        self._decided.append(raw)
        return True

    def pending_first_seen(self, key: FlowKey) -> int:
        """When the datapath first saw ``key`` (CLOCK_MONOTONIC ns), 0 if not pending."""
        self.settle_pending()
        raw = self.pending.lookup(key.pack())
        return int.from_bytes(raw[:8], "little") if raw else 0

    def mark_pass(self, key: FlowKey) -> None:
        raw = key.pack()
        self.flows.update(raw, pass_value())
        self._decided.append(raw)

    def settle_pending(self) -> int:
        """Delete the tuples decided since the last call (offloaded or
        passed) from the pending map, in one batch: a delete each was a
        syscall per new flow. Until then the datapath finds their flow or
        drop entry first and never reads the pending one; every read of the
        pending map here settles first. How many went."""
        if not self._decided:
            return 0
        keys, self._decided = self._decided, []
        return self.pending.delete_batch(keys)

    def remove(self, keys: list[FlowKey]) -> int:
        return self.flows.delete_batch([k.pack() for k in keys])

    def flow_entries(self) -> Iterator[FlowEntry]:
        for raw_key, raw_val in self.flows.items():
            yield flow_entry(raw_key, raw_val)

    def pending_keys(self) -> Iterator[bytes]:
        """The raw keys of every pending tuple, read in batches."""
        self.settle_pending()
        ks = self.pending.key_size
        for kb, _vb, n in self.pending.batches():
            for i in range(n):
                yield kb[i * ks : (i + 1) * ks]

    def pending_entries(self) -> Iterator[tuple[FlowKey, int, int, int]]:
        """(key, first_seen_ns, packets, bytes) of every pending tuple."""
        self.settle_pending()
        lay = self.layout
        for raw_key, raw_val in self.pending.items():
            p = lay.from_bytes("struct ofl_pending", raw_val)
            yield FlowKey.unpack(raw_key), p.first_seen_ns, p.packets, p.bytes

    def stats(self) -> dict[str, int]:
        """Datapath counters summed over CPUs, by name (rx, new, redirect, ...)."""
        lay = self.layout
        ncpu = os.cpu_count() or 1
        possible = _possible_cpus() or ncpu
        out: dict[str, int] = {}
        names = sorted(((v, k) for k, v in lay.consts.items() if k.startswith("OFL_STAT_")
                        and k != "OFL_STAT_MAX"))
        for idx, name in names:
            raw = self.stats_map.lookup(idx.to_bytes(4, "little"), value_size=8 * possible)
            total = 0
            if raw:
                total = sum(int.from_bytes(raw[i * 8 : i * 8 + 8], "little") for i in range(possible))
            out[name.removeprefix("OFL_STAT_").lower()] = total
        return out


def _possible_cpus() -> int:
    """Count of possible CPUs (what per-CPU map values are sized by)."""
    try:
        text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    except OSError:
        return 0
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += (int(hi) if hi else int(lo)) - int(lo) + 1
    return count
