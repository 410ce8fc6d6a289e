"""Raw flow-map records, read without building objects.

The sweep walks every entry of the flow map once a tick; building a
``FlowEntry`` per entry would cost more than the rest of the sweep. These
offsets and ``struct`` formats come from the shared header through cffi, so
they follow any change of its layout.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence

from . import ctnetlink
from .layout import layout


class Records:
    """Byte offsets into raw ``struct ofl_key`` / ``struct ofl_flow`` bytes."""

    def __init__(self) -> None:
        ffi = layout().ffi
        consts = layout().consts
        self.state_offload = consts["OFL_STATE_OFFLOAD"]
        self.flag_reply = consts["OFL_V_REPLY"]
        self.flag_assured = consts["OFL_V_ASSURED"]
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
        self.v_mark = ffi.offsetof("struct ofl_verdict", "ct_mark")
        self.k_ifindex = ffi.offsetof("struct ofl_key", "ifindex")
        self.k_vlan = ffi.offsetof("struct ofl_key", "vlan_outer")
        self.k_pppoe = ffi.offsetof("struct ofl_key", "pppoe_sid")
        self.k_dsa_port = ffi.offsetof("struct ofl_key", "dsa_port")
        self.f_packets = ffi.offsetof("struct ofl_flow", "packets")
        self.f_bytes = ffi.offsetof("struct ofl_flow", "bytes")
        self.v_vlan = ffi.offsetof("struct ofl_verdict", "vlan_proto")
        self.v_pppoe = ffi.offsetof("struct ofl_verdict", "pppoe_sid")
        self.v_dsa = ffi.offsetof("struct ofl_verdict", "dsa_proto")
        self.flag_tc = consts["OFL_V_TC"]
        self.seen_closing = consts["OFL_SEEN_FIN"] | consts["OFL_SEEN_RST"] | consts["OFL_SEEN_SYN"]
        self.seen_kernel = consts["OFL_SEEN_KERNEL"]
        self.dsa_port_none = consts["OFL_DSA_PORT_NONE"]
        self.key_size = ffi.sizeof("struct ofl_key")
        self.e_stamp = ffi.offsetof("struct ofl_event", "ts_ns")
        self._wire_spans = _spans([(self.k_proto, 1), (self.k_sport, 4), (self.k_saddr, 16),
                                   (self.k_daddr, 16)])
        self.flow_size = ffi.sizeof("struct ofl_flow")
        # (proto, sport, dport) of a key; (verdict flags, conntrack zone,
        # last seen, state, seen flags) of a flow.
        self.key_fields = struct_of(self.key_size, [
            (self.k_proto, "B"), (self.k_sport, "!H"), (self.k_sport + 2, "!H")])
        self.flow_fields = struct_of(self.flow_size, [
            (self.v_flags, "B"), (self.v_zone, "H"), (self.f_last, "Q"), (self.f_state, "I"),
            (self.f_seen, "I")])

    def key_column(self, kb: bytes, offset: int, code: str) -> Sequence[int]:
        return column(kb, self.key_size, offset, code)

    def flow_column(self, vb: bytes, offset: int, code: str) -> Sequence[int]:
        return column(vb, self.flow_size, offset, code)

    def ct_item(self, k: bytes, reply: bool, zone: int,
                timeout: int) -> tuple[bytes, bytes, bytes, bytes, int, bool, int, int]:
        """What a conntrack timeout update of the key ``k`` is packed from
        (Conntrack.refresh_keys, put_back): source, destination, source and
        destination port, all as the key's bytes (network order), protocol,
        is reply, zone, timeout."""
        n = 4 if k[self.k_family] == socket.AF_INET else 16
        sa, da, sp = self.k_saddr, self.k_daddr, self.k_sport
        return (k[sa : sa + n], k[da : da + n], k[sp : sp + 2], k[sp + 2 : sp + 4],
                k[self.k_proto], reply, zone, timeout)

    def raw5(self, raw_key: bytes) -> ctnetlink.Raw5:
        """(proto, src, dst, sport, dport) straight from key bytes, addresses
        packed (4 or 16 bytes): what the ctnetlink encoder takes."""
        sport, dport = struct.unpack_from("!HH", raw_key, self.k_sport)
        n = 4 if raw_key[self.k_family] == socket.AF_INET else 16
        return (raw_key[self.k_proto], raw_key[self.k_saddr : self.k_saddr + n],
                raw_key[self.k_daddr : self.k_daddr + n], sport, dport)

    def wire(self, raw_key: bytes) -> bytes:
        """The connection-direction id of a key (see conntrack.wire_id): the
        key's own bytes (proto, ports in network order, both addresses, an
        IPv4 one zero-padded to 16 bytes as in a wire id), sliced, not built
        field by field: this runs for every new tuple."""
        spans = self._wire_spans
        if len(spans) == 2:  # the header's layout: proto, then ports and addresses back to back
            (a, b), (c, d) = spans
            return raw_key[a:b] + raw_key[c:d]
        return b"".join(raw_key[a:b] for a, b in spans)

    def zone(self, raw_flow: bytes) -> int:
        return int.from_bytes(raw_flow[self.v_zone : self.v_zone + 2], "little")

    def tc_can_forward(self, raw_key: bytes, raw_flow: bytes) -> bool:
        """No encapsulation on either side: TC forwards GSO packets of such
        a flow whole (it cannot strip PPPoE or switch tags on a lowest
        device, nor push headers onto a GSO packet)."""
        k, f = raw_key, raw_flow
        return (not any(k[self.k_vlan : self.k_vlan + 2]) and not any(k[self.k_pppoe : self.k_pppoe + 2])
                and k[self.k_dsa_port] == self.dsa_port_none
                and not any(f[self.v_vlan : self.v_vlan + 2])
                and not any(f[self.v_pppoe : self.v_pppoe + 2]) and not f[self.v_dsa])

    def with_flags(self, raw_flow: bytes, add: int) -> bytes:
        i = self.v_flags
        return raw_flow[:i] + bytes([raw_flow[i] | add]) + raw_flow[i + 1 :]

    def dmac(self, raw_flow: bytes) -> bytes:
        return raw_flow[self.v_dmac : self.v_dmac + 6]


def _spans(fields: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(start, end) of each (offset, size) in order, adjacent ones merged."""
    out: list[tuple[int, int]] = []
    for offset, size in fields:
        if out and out[-1][1] == offset:
            out[-1] = (out[-1][0], offset + size)
        else:
            out.append((offset, offset + size))
    return out


def column(buf: bytes, stride: int, offset: int, code: str) -> Sequence[int]:
    """One field of every ``stride``-byte record in ``buf``, as host-order
    ints, without a Python step per record: a strided view where the field
    is aligned to its size (the header's layout), else a struct walk."""
    size = struct.calcsize(code)
    if offset % size == 0 and stride % size == 0 and len(buf) % size == 0:
        view: Sequence[int] = memoryview(buf).cast(code)  # type: ignore[call-overload]
        return view[offset // size :: stride // size]
    one = struct_of(stride, [(offset, code)])
    return [v for (v,) in one.iter_unpack(buf)]


def struct_of(size: int, fields: list[tuple[int, str]]) -> struct.Struct:
    """A struct.Struct reading ``fields`` ((offset, code), ascending) of a
    ``size``-byte record, host byte order, padding skipped. A code with a
    leading "!" is big-endian: read as host order and swapped by the caller
    only where it matters (ports are only compared here)."""
    fmt, pos = "=", 0
    for offset, code in fields:
        code = code.lstrip("!")
        fmt += f"{offset - pos}x{code}" if offset > pos else code
        pos = offset + struct.calcsize("=" + code)
    fmt += f"{size - pos}x" if size > pos else ""
    return struct.Struct(fmt)
