"""Incremental Internet checksum arithmetic (RFC 1071, RFC 1624).

A NAT rewrite changes a few 16-bit words of a header; the datapath updates
the checksum with HC' = ~(~HC + ~m + m') (RFC 1624 eqn. 3) instead of
summing the packet again. The agent computes the ``~m + m'`` part here once
per flow. All values are 16-bit integers in network byte order.
"""

from __future__ import annotations

import struct


def fold(value: int) -> int:
    """Fold a one's complement sum into 16 bits (end-around carry)."""
    while value >> 16:
        value = (value & 0xFFFF) + (value >> 16)
    return value


def words(data: bytes) -> list[int]:
    """The 16-bit network-order words of ``data`` (odd length: zero-padded)."""
    if len(data) % 2:
        data += b"\0"
    return list(struct.unpack(f"!{len(data) // 2}H", data))


def checksum(data: bytes) -> int:
    """The Internet checksum of ``data`` (RFC 1071)."""
    return ~fold(sum(words(data))) & 0xFFFF


def delta(old: bytes, new: bytes) -> int:
    """The sum ``~m + m'`` over the changed words, to be added to ~HC.

    Returns 0 for no change: the one's complement zero 0xffff is normalised
    to 0, so applying a no-op delta leaves a checksum exactly as it was.
    """
    if len(old) != len(new):
        raise ValueError("old and new must be the same length")
    total = sum((~w) & 0xFFFF for w in words(old)) + sum(words(new))
    value = fold(total)
    return 0 if value == 0xFFFF else value


def add(a: int, b: int) -> int:
    """One's complement sum of two deltas."""
    value = fold(a + b)
    return 0 if value == 0xFFFF else value


def apply(check: int, diff: int) -> int:
    """The checksum after adding ``diff`` (RFC 1624 eqn. 3), as the datapath does."""
    return ~fold(((~check) & 0xFFFF) + diff) & 0xFFFF


def replace_by_diff(check: int, diff: int) -> int:
    """The kernel's csum_replace_by_diff() (what bpf_l4_csum_replace() does
    with a diff on a complete checksum), in network byte order: the datapath
    applies each L4 delta this way in XDP and TC alike."""
    total = 0xFFFF0000 | (~check & 0xFFFF)  # ~csum_unfold(check)
    total += diff
    total = (total & 0xFFFFFFFF) + (total >> 32)  # csum_add: end-around carry
    return ~fold(total) & 0xFFFF
