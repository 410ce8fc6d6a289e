"""RFC 1624 incremental checksums against scapy's full recomputation."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from offloader import csum

addr4 = st.integers(0, 2**32 - 1).map(lambda v: str(ipaddress.IPv4Address(v)))
addr6 = st.integers(0, 2**128 - 1).map(lambda v: str(ipaddress.IPv6Address(v)))
port = st.integers(0, 0xFFFF)


def same(a: int, b: int) -> bool:
    """Equal in one's complement (0x0000 and 0xffff are both zero)."""
    return a == b or {a, b} == {0, 0xFFFF}


def full_l4(pkt: IP | IPv6) -> int:
    """The L4 checksum scapy computes for the whole packet."""
    layer = pkt[TCP] if TCP in pkt else pkt[UDP]
    del layer.chksum
    rebuilt = pkt.__class__(bytes(pkt))
    return int((rebuilt[TCP] if TCP in rebuilt else rebuilt[UDP]).chksum)


@settings(max_examples=400, deadline=None)
@given(st.booleans(), addr4, addr4, port, port, addr4, addr4, port, port, st.binary(max_size=64))
def test_nat_deltas_match_recomputation_v4(tcp: bool, s: str, d: str, sp: int, dp: int,
                                           ns: str, nd: str, nsp: int, ndp: int,
                                           payload: bytes) -> None:
    l4 = TCP(sport=sp, dport=dp) if tcp else UDP(sport=sp, dport=dp)
    before = IP(bytes(IP(src=s, dst=d) / l4 / payload))
    old_l4 = full_l4(before.copy())
    old_ip = int(before.chksum)
    d_addr = csum.delta(ipaddress.ip_address(s).packed + ipaddress.ip_address(d).packed,
                        ipaddress.ip_address(ns).packed + ipaddress.ip_address(nd).packed)
    d_port = csum.delta(sp.to_bytes(2, "big") + dp.to_bytes(2, "big"),
                        nsp.to_bytes(2, "big") + ndp.to_bytes(2, "big"))
    after = before.copy()
    after.src, after.dst = ns, nd
    (after[TCP] if tcp else after[UDP]).sport = nsp
    (after[TCP] if tcp else after[UDP]).dport = ndp
    del after.chksum
    want_ip = int(IP(bytes(after)).chksum)
    assert same(csum.apply(old_ip, d_addr), want_ip)
    want_l4 = full_l4(after)
    # One combined delta (RFC 1624 eqn. 3) ...
    assert same(csum.apply(old_l4, csum.add(d_addr, d_port)), want_l4)
    # ... and the datapath's two steps with the kernel's arithmetic.
    assert same(csum.replace_by_diff(csum.replace_by_diff(old_l4, d_addr), d_port), want_l4)


@settings(max_examples=200, deadline=None)
@given(addr6, addr6, port, addr6, port)
def test_nat_deltas_match_recomputation_v6(s: str, d: str, sp: int, ns: str, nsp: int) -> None:
    before = IPv6(bytes(IPv6(src=s, dst=d) / TCP(sport=sp, dport=443) / b"data"))
    old = full_l4(before.copy())
    d_addr = csum.delta(ipaddress.ip_address(s).packed, ipaddress.ip_address(ns).packed)
    d_port = csum.delta(sp.to_bytes(2, "big"), nsp.to_bytes(2, "big"))
    after = before.copy()
    after.src = ns
    after[TCP].sport = nsp
    assert same(csum.replace_by_diff(csum.replace_by_diff(old, d_addr), d_port), full_l4(after))


def test_no_change_is_zero_not_negative_zero() -> None:
    assert csum.delta(b"\x12\x34", b"\x12\x34") == 0
    assert csum.add(0x1234, 0xEDCB) == 0  # x + ~x = 0xffff, normalised to 0
    assert csum.apply(0xABCD, 0) == 0xABCD


def test_end_around_carry() -> None:
    # 0xffff + 0x0001 carries out of bit 15 and back into bit 0.
    assert csum.fold(0xFFFF + 0x0001) == 0x0001
    assert csum.delta(b"\x00\x00", b"\xff\xff") == 0  # ~0 + 0xffff = 0x1fffe -> 0xffff -> 0
    assert csum.apply(0x0000, 0x0001) == 0xFFFE


def test_kernel_arithmetic_corner() -> None:
    # A checksum field of 0xffff with a delta summing to one's complement
    # zero: the kernel's csum_replace_by_diff gives +0, RFC 1624 eqn. 3 keeps
    # 0xffff; both verify.
    assert csum.replace_by_diff(0xFFFF, 0) == 0x0000
    assert csum.apply(0xFFFF, 0) == 0xFFFF


def test_checksum_of_known_header() -> None:
    # RFC 1071 example words: 0x0001 0xf203 0xf4f5 0xf6f7 -> sum 0xddf2, checksum 0x220d
    assert csum.checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
