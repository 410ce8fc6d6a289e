"""nftables netlink messages built byte for byte as the kernel sends them,
for tests of what the agent reads from rule and chain dumps."""

from __future__ import annotations

import struct

NFT_MSG_NEWCHAIN, NFT_MSG_NEWRULE = 3, 6


def nla(kind: int, payload: bytes, nested: bool = False) -> bytes:
    body = struct.pack("=HH", 4 + len(payload), kind | (0x8000 if nested else 0)) + payload
    return body + b"\0" * (-len(body) % 4)


def expr(name: str, data: bytes = b"") -> bytes:
    inner = nla(1, name.encode() + b"\0") + (nla(2, data, nested=True) if data else b"")
    return nla(1, inner, nested=True)


def message(kind: int, family: int, body: bytes) -> bytes:
    body = struct.pack("=BBH", family, 0, 0) + body
    return struct.pack("=IHHII", 16 + len(body), (10 << 8) | kind, 2, 1, 0) + body


def rule(family: int, *exprs: bytes, table: bytes = b"t", chain: bytes = b"c") -> bytes:
    """An NFT_MSG_NEWRULE of ``table``/``chain`` with these expressions."""
    return message(NFT_MSG_NEWRULE, family, nla(1, table + b"\0") + nla(2, chain + b"\0")
                   + nla(4, b"".join(exprs), nested=True))


def chain(family: int, name: bytes, hooknum: int | None = None, table: bytes = b"t") -> bytes:
    """An NFT_MSG_NEWCHAIN: a base chain at ``hooknum``, or a regular chain."""
    hook = b"" if hooknum is None else nla(4, nla(1, hooknum.to_bytes(4, "big")), nested=True)
    return message(NFT_MSG_NEWCHAIN, family, nla(1, table + b"\0") + nla(3, name + b"\0") + hook)
