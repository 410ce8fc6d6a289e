"""Raw flow-map records, read without building objects.

The sweep walks every entry of the flow map once a tick; building a
``FlowEntry`` per entry would cost more than the rest of the sweep. These
offsets and ``struct`` formats come from the shared header through cffi, so
they follow any change of its layout.
"""

from __future__ import annotations

import functools
import socket
import struct
import sys
from array import array
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
        self.flag_young = consts["OFL_V_YOUNG"]
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
        # The fields the sweep tests a whole batch at a time (Columns), as
        # indexes into a batch read as machine words of their size.
        self.w_sport = word_index(self.k_sport, 2, self.key_size)
        self.w_last = word_index(self.f_last, 8, self.flow_size)
        self.w_state = word_index(self.f_state, 4, self.flow_size)
        self.w_seen = word_index(self.f_seen, 4, self.flow_size)

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

    def offloaded(self, raw_flow: bytes) -> bool:
        return int.from_bytes(raw_flow[self.f_state : self.f_state + 4], "little") == self.state_offload

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

    def with_flags(self, raw_flow: bytes, add: int, drop: int = 0) -> bytes:
        i = self.v_flags
        return raw_flow[:i] + bytes([(raw_flow[i] | add) & ~drop]) + raw_flow[i + 1 :]

    def ifindex(self, raw_key: bytes) -> int:
        """The ingress device of a raw ofl_key."""
        i = self.k_ifindex
        return int.from_bytes(raw_key[i : i + 4], sys.byteorder)

    def dmac(self, raw_flow: bytes) -> bytes:
        return raw_flow[self.v_dmac : self.v_dmac + 6]


class Columns:
    """One batch of the flow map (keys and values back to back) read as
    columns of machine words: one copy of the batch into an ``array`` per
    word size, then a strided slice per field, all in C. A column's items
    are ints like a list's, but what the sweep asks of every entry at once
    (are all offloaded, has any a seen flag, is any older than a bound, the
    ports' hash) is answered from the columns' bytes without an int object
    per entry; only the entries picked are then looked at one by one."""

    __slots__ = ("n", "states", "seens", "lasts", "sports", "dports", "_hashes")
    n: int
    states: array[int]
    seens: array[int]
    lasts: array[int]
    sports: array[int]
    dports: array[int]

    def __init__(self, rec: Records, kb: bytes, vb: bytes) -> None:
        fs, ks = rec.flow_size, rec.key_size
        self.n = len(vb) // fs
        w32 = array("I", vb)
        self.states = w32[rec.w_state :: fs // 4]
        self.seens = w32[rec.w_seen :: fs // 4]
        self.lasts = array("Q", vb)[rec.w_last :: fs // 8]
        # Ports as the key's bytes read in host order: only compared and hashed.
        w16 = array("H", kb)
        self.sports = w16[rec.w_sport :: ks // 2]
        self.dports = w16[rec.w_sport + 1 :: ks // 2]
        self._hashes: tuple[memoryview, bytes] | None = None

    def all_equal(self, column: array[int], value: int) -> bool:
        """Whether every item of ``column`` (states, seens) is ``value``."""
        same: bytes = value.to_bytes(column.itemsize, sys.byteorder) * self.n
        return column.tobytes() == same

    def lasts_at_least(self, bound: int) -> bool:
        """Whether every last-seen stamp is ``bound`` or later: one sum over
        the whole column as one big integer (SIMD within a register). Each
        64-bit lane gets 2**63 added and ``bound`` taken away; with the
        stamps and the bound below 2**63 (monotonic nanoseconds) a lane
        stays within [1, 2**64), no borrow crosses into the next one, and
        its top bit says whether that stamp is at least ``bound``."""
        if bound <= 0:
            return True
        lanes = int.from_bytes(self.lasts.tobytes(), sys.byteorder)
        ones, top = _lanes(self.n)
        if lanes & top or bound >= 1 << 63:  # outside the clock's range: not decided here
            return False
        return (lanes + top - bound * ones) & top == top

    def port_hashes(self) -> tuple[memoryview, bytes]:
        """(sport ^ dport of every key, the hashes' high bytes), the xor
        taken over the two columns as big integers (once a batch)."""
        if self._hashes is None:
            raw = (int.from_bytes(self.sports.tobytes(), "little")
                   ^ int.from_bytes(self.dports.tobytes(), "little")).to_bytes(2 * self.n, "little")
            self._hashes = memoryview(raw).cast("H"), raw[_HIGH_BYTE::2]
        return self._hashes


@functools.lru_cache(maxsize=64)  # batch sizes: SERVED_BATCH and a few short of it
def _lanes(n: int) -> tuple[int, int]:
    """(1 in each of ``n`` 64-bit lanes, 2**63 in each) as big integers."""
    ones = int.from_bytes((1).to_bytes(8, "little") * n, "little")
    return ones, ones << 63


_HIGH_BYTE = 1 if sys.byteorder == "little" else 0  # of a 16-bit word in memory
_WORD = {2: "H", 4: "I", 8: "Q"}  # array type codes by size


def word_index(offset: int, size: int, record_size: int) -> int:
    """``offset`` in ``size``-byte words; the field and the record must be
    aligned to that size (the shared header's layout is: a change that
    breaks it fails here, at start, not with wrong answers)."""
    if offset % size or record_size % size or array(_WORD[size]).itemsize != size:
        raise ValueError(f"field at {offset} of a {record_size}-byte record is not "
                         f"{size}-byte aligned")
    return offset // size


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
