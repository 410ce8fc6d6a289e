"""The packet mark a forwarded packet carries when the kernel routes it.

Policy routing by mark (`ip rule ... fwmark V/M lookup T`) routes by the mark
the packet carries at the routing decision, which prerouting (or ingress)
rules set. The agent knows the connection's conntrack mark (CTA_MARK); the
OpenWrt multi-WAN packages (mwan3, pbr) and fw4 pin a connection to an uplink
by that mark and restore it on every packet (`meta mark set ct mark`). So the
packet mark is the conntrack mark exactly when the ruleset says so. From the
nftables ruleset (read with `nft -j list ruleset`, again whenever its
generation id changes):

  - no rule sets the packet mark: packets are routed with mark 0;
  - rules set it only by restoring the conntrack mark (with one mask):
    the conntrack mark under that mask;
  - some rule sets it otherwise (a value, a map, iptables' MARK target): a
    connection whose conntrack mark is set, with a restore in place, is
    taken at its conntrack mark (mwan3's pattern: mark once, save, restore);
    a connection with mark 0, or no restore at all, cannot be told (None).

Only base chains at the prerouting and ingress hooks, and regular chains
(they may be jumped to from those), count: marks set later do not change the
routing decision of a forwarded packet. docs/resolution.md, "Policy routing",
says what the resolver does with an answer of None.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink import NETLINK_NETFILTER, NLM_F_REQUEST
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES
from pyroute2.netlink.nfnetlink.nftsocket import NFT_MSG_GETGEN, NFT_MSG_NEWGEN

ALL_BITS = 0xFFFFFFFF
ROUTING_HOOKS = ("prerouting", "ingress")  # hooks that run before a forwarded packet's route
NFTA_GEN_ID = 1
_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("=BBH")


@dataclass(frozen=True, slots=True)
class MarkSetters:
    """How the ruleset sets the packet mark before routing."""

    restore_masks: frozenset[int] = frozenset()  # masks of `meta mark set ct mark [and M]`
    other: bool = False  # some rule sets it from anything else

    def packet_mark(self, ct_mark: int) -> int | None:
        """The mark a packet of a connection with ``ct_mark`` is routed with,
        None when the ruleset leaves it unknown."""
        if len(self.restore_masks) > 1:
            return None  # restores under different masks: which one ran is not known
        if not self.restore_masks:
            return None if self.other else 0
        if self.other and not ct_mark:
            return None  # the mark may be set per packet and never saved
        (mask,) = self.restore_masks
        return ct_mark & mask


UNKNOWN = MarkSetters(other=True)


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object inside ``node``."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _restore_mask(value: Any) -> int | None:
    """The mask of a value that is the conntrack mark (under a mask), else None."""
    if value == {"ct": {"key": "mark"}}:
        return ALL_BITS
    if isinstance(value, dict) and isinstance(value.get("&"), list) and len(value["&"]) == 2:
        left, right = value["&"]
        if left == {"ct": {"key": "mark"}} and isinstance(right, int):
            return right
    return None


def _rule_setters(expr: Any) -> tuple[set[int], bool]:
    restores: set[int] = set()
    other = False
    for node in _walk(expr):
        mangle = node.get("mangle")
        if isinstance(mangle, dict) and mangle.get("key") == {"meta": {"key": "mark"}}:
            mask = _restore_mask(mangle.get("value"))
            if mask is None:
                other = True
            else:
                restores.add(mask)
        xt = node.get("xt")
        if isinstance(xt, dict) and xt.get("type") == "target":
            if xt.get("name") == "CONNMARK":  # iptables-nft: its options are not shown
                restores.add(ALL_BITS)
            elif xt.get("name") == "MARK":
                other = True
    return restores, other


def mark_setters(ruleset: dict[str, Any]) -> MarkSetters:
    """How ``nft -j list ruleset``'s rules set the packet mark before routing."""
    items = ruleset.get("nftables", [])
    late = {(c["family"], c["table"], c["name"]) for c in
            (i["chain"] for i in items if isinstance(i, dict) and "chain" in i)
            if c.get("hook") and c["hook"] not in ROUTING_HOOKS}
    restores: set[int] = set()
    other = False
    for item in items:
        rule = item.get("rule") if isinstance(item, dict) else None
        if rule is None or (rule.get("family"), rule.get("table"), rule.get("chain")) in late:
            continue
        r, o = _rule_setters(rule.get("expr", []))
        restores |= r
        other |= o
    return MarkSetters(frozenset(restores), other)


def read_ruleset() -> dict[str, Any]:
    proc = subprocess.run(["nft", "-j", "list", "ruleset"], capture_output=True, text=True,
                          timeout=10, check=True)
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def ruleset_generation(sock: socket.socket) -> int:
    """nftables' ruleset generation id (NFT_MSG_GETGEN): it changes with
    every committed change of the ruleset."""
    payload = _NFGENMSG.pack(socket.AF_UNSPEC, 0, 0)
    kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN
    sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(payload), kind, NLM_F_REQUEST, 1, 0) + payload)
    data = sock.recv(4096)
    length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data)
    if kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN:
        raise OSError("no nftables generation in the answer")
    pos = _NLMSGHDR.size + _NFGENMSG.size
    while pos + 4 <= min(length, len(data)):
        alen, atype = struct.unpack_from("=HH", data, pos)
        if alen < 4:
            break
        if atype & 0x3FFF == NFTA_GEN_ID:
            return int(struct.unpack_from("!I", data, pos + 4)[0])
        pos += (alen + 3) & ~3
    raise OSError("no nftables generation in the answer")


class Ruleset:
    """The nftables ruleset's mark setters, read again when its generation
    changes. Anything that cannot be read counts as unknown."""

    def __init__(self, reader: Callable[[], dict[str, Any]] = read_ruleset,
                 generation: Callable[[], int] | None = None) -> None:
        self._reader = reader
        self._generation = generation or self._netlink_generation
        self._sock: socket.socket | None = None
        self._gen: int | None = None
        self._setters = UNKNOWN

    def _netlink_generation(self) -> int:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            self._sock.settimeout(1.0)  # the kernel answers inside send()
        return ruleset_generation(self._sock)

    def setters(self) -> MarkSetters:
        try:
            gen = self._generation()
            if gen != self._gen:
                self._setters = mark_setters(self._reader())
                self._gen = gen
        except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError, AttributeError):
            self._gen = None
            self._setters = UNKNOWN
        return self._setters

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
