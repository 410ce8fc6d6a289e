"""The per-flow hot paths written with struct instead of cffi field by
field: the same bytes as the cffi layout of the shared header."""

from __future__ import annotations

import ipaddress
import random
import socket

from offloader import csum
from offloader.datapath import FlowKey
from offloader.layout import layout

ip = ipaddress.ip_address


def cffi_key(k: FlowKey) -> bytes:
    """A key packed field by field through cffi, as the agent did before."""
    lay = layout()
    c = lay.new("struct ofl_key")
    c.ifindex, c.vlan_outer, c.vlan_inner = k.ifindex, k.vlan_outer, k.vlan_inner
    c.pppoe_sid, c.dsa_port, c.family, c.proto = k.pppoe_sid, k.dsa_port, k.family, k.proto
    c.sport, c.dport = socket.htons(k.sport), socket.htons(k.dport)
    lay.ffi.memmove(c.saddr, k.src.packed.ljust(16, b"\0"), 16)
    lay.ffi.memmove(c.daddr, k.dst.packed.ljust(16, b"\0"), 16)
    return lay.to_bytes(c)


def test_a_key_packs_as_the_header_lays_it_out_and_back() -> None:
    keys = [FlowKey(7, socket.AF_INET, 17, ip("198.18.1.2"), ip("198.19.2.2"), 40000, 53),
            FlowKey(0x01020304, socket.AF_INET6, 6, ip("2001:db8::1"), ip("2001:db8:ff::2"),
                    65535, 1, vlan_outer=4094, vlan_inner=7, pppoe_sid=0xBEEF, dsa_port=3)]
    for k in keys:
        raw = k.pack()
        assert raw == cffi_key(k)
        assert len(raw) == layout().sizeof("struct ofl_key")
        assert FlowKey.unpack(raw) == k


def test_checksum_words_are_network_order() -> None:
    rnd = random.Random(7)
    for n in (0, 1, 2, 3, 16, 33):
        data = bytes(rnd.randrange(256) for _ in range(n))
        padded = data + b"\0" * (n % 2)
        assert csum.words(data) == [padded[i] << 8 | padded[i + 1] for i in range(0, n + n % 2, 2)]
