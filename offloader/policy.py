"""The packet mark a forwarded packet carries when the kernel routes it.

Policy routing by mark (`ip rule ... fwmark V/M lookup T`) routes by the mark
the packet carries at the routing decision, which prerouting (or ingress)
rules set. The agent knows the connection's conntrack mark (CTA_MARK); the
OpenWrt multi-WAN packages (mwan3, pbr) and fw4 pin a connection to an uplink
by that mark and restore it on every packet (`meta mark set ct mark`). So the
packet mark is the conntrack mark exactly when the ruleset says so. From the
nftables ruleset (its chains and rules, dumped over netlink by
offloader/nftnl.py; in the agent, once per change its ruleset watcher reads):

  - no rule sets the packet mark: packets are routed with mark 0;
  - rules set it only by restoring the conntrack mark (with one mask):
    the conntrack mark under that mask;
  - some rule sets it otherwise (a value, a map, iptables' MARK target): a
    connection whose conntrack mark is set, with a restore in place, is
    taken at its conntrack mark (mwan3's pattern: mark once, save, restore);
    a connection with mark 0, or no restore at all, cannot be told (None).

Only base chains at the prerouting and ingress hooks, and regular chains
(they may be jumped to from those), count: marks set later do not change the
routing decision of a forwarded packet. Rules are read as the kernel holds
them: `meta mark set ct mark and M` is a ct load into a register, a
bitwise AND and a meta set from that register, followed register by
register. docs/resolution.md, "Policy routing",
says what the resolver does with an answer of None.
"""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES
from pyroute2.netlink.nfnetlink.nftsocket import (
    NFPROTO_BRIDGE,
    NFPROTO_INET,
    NFPROTO_IPV4,
    NFPROTO_IPV6,
    NFPROTO_NETDEV,
    NFT_MSG_GETCHAIN,
    NFT_MSG_GETRULE,
    NFT_MSG_NEWCHAIN,
    NFT_MSG_NEWRULE,
)

from . import nftnl

ALL_BITS = 0xFFFFFFFF


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


# Hooks that run before a forwarded packet's route, by nfgen family: prerouting
# (ip, ip6, inet, bridge), ingress (inet's hook 5, netdev's hook 0).
ROUTING_HOOKS = frozenset({(NFPROTO_INET, 0), (NFPROTO_IPV4, 0), (NFPROTO_IPV6, 0),
                           (NFPROTO_BRIDGE, 0), (NFPROTO_INET, 5), (NFPROTO_NETDEV, 0)})
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME, NFTA_CHAIN_HOOK, NFTA_HOOK_HOOKNUM = 1, 3, 4, 1
NFTA_RULE_TABLE, NFTA_RULE_CHAIN = 1, 2
NFTA_CT_DREG, NFTA_CT_KEY, NFT_CT_MARK = 1, 2, 3
NFTA_META_KEY, NFTA_META_SREG, NFT_META_MARK = 2, 3, 3
NFTA_BITWISE_SREG, NFTA_BITWISE_DREG, NFTA_BITWISE_LEN = 1, 2, 3
NFTA_BITWISE_MASK, NFTA_BITWISE_XOR, NFTA_BITWISE_OP, NFTA_DATA_VALUE = 4, 5, 6, 1
NFT_BITWISE_MASK_XOR = 0  # `reg & mask ^ xor`, what nft emits for `ct mark and M`


def _u32(payload: bytes) -> int | None:
    return int.from_bytes(payload[:4], "big") if len(payload) >= 4 else None


def _value(payload: bytes) -> int | None:
    """A register-sized constant (NFTA_DATA_VALUE): host byte order, as the
    mark sits in a register."""
    for kind, data in nftnl.attrs(payload):
        if kind == NFTA_DATA_VALUE and len(data) == 4:
            return int.from_bytes(data, sys.byteorder)
    return None


def _and_mask(a: dict[int, bytes]) -> int | None:
    """The mask of a bitwise expression that only ANDs (`reg & M ^ 0`), else None."""
    mask, xor = _value(a.get(NFTA_BITWISE_MASK, b"")), _value(a.get(NFTA_BITWISE_XOR, b""))
    op = _u32(a.get(NFTA_BITWISE_OP, b"")) or NFT_BITWISE_MASK_XOR
    if op != NFT_BITWISE_MASK_XOR or xor != 0 or _u32(a.get(NFTA_BITWISE_LEN, b"")) != 4:
        return None
    return mask


def _loaded(name: str, a: dict[int, bytes], ct_mark: dict[int, int]) -> bool:
    """Follow what a register-writing expression leaves in ``ct_mark``
    (register -> mask: the register holds the conntrack mark under it);
    False when ``name`` is not one whose writes are followed here."""
    if name == "ct" and NFTA_CT_DREG in a:
        reg = _u32(a[NFTA_CT_DREG])
        mask = ALL_BITS if _u32(a.get(NFTA_CT_KEY, b"")) == NFT_CT_MARK else None
    elif name == "bitwise":
        reg = _u32(a.get(NFTA_BITWISE_DREG, b""))
        sreg, mask = _u32(a.get(NFTA_BITWISE_SREG, b"")), _and_mask(a)
        held = ct_mark.get(sreg) if sreg is not None else None
        mask = held & mask if held is not None and mask is not None else None
    else:
        return False
    if reg is None:
        ct_mark.clear()
    else:
        ct_mark.pop(reg, None)
        if mask is not None:
            ct_mark[reg] = mask
    return True


def rule_setters(body: bytes) -> tuple[set[int], bool]:
    """(masks of conntrack-mark restores, whether it sets the mark otherwise)
    of one rule (an NFT_MSG_NEWRULE body). The registers are followed through
    the rule: `meta mark set ct mark and M` is a ct load, a bitwise AND and a
    meta set of that register; whatever else wrote a register makes its
    value unknown, and a mark set from an unknown value counts as other."""
    restores: set[int] = set()
    other = False
    ct_mark: dict[int, int] = {}
    for name, a in nftnl.expressions(body):
        if _loaded(name, a, ct_mark):
            continue
        if name == "meta" and NFTA_META_SREG in a:
            if _u32(a.get(NFTA_META_KEY, b"")) == NFT_META_MARK:
                sreg = _u32(a[NFTA_META_SREG])
                mask = ct_mark.get(sreg) if sreg is not None else None
                if mask is None:
                    other = True
                else:
                    restores.add(mask)
        elif name == "CONNMARK":  # iptables-nft: its options are not in the rule
            restores.add(ALL_BITS)
        elif name == "MARK":
            other = True
        else:
            ct_mark.clear()  # which register it wrote is not known here
    return restores, other


def mark_setters(chains: Iterable[bytes], rules: Iterable[bytes],
                 proc: Path = Path("/proc/net")) -> MarkSetters:
    """How the ruleset sets the packet mark before routing, from the datagrams
    of an NFT_MSG_GETCHAIN and an NFT_MSG_GETRULE dump. Rules in base chains
    at later hooks do not count; a legacy iptables mangle table (invisible
    to nftables' dumps, listed in /proc/net) may set marks: other."""
    late: set[tuple[int, bytes, bytes]] = set()
    for chunk in chains:
        for kind, family, body in nftnl.messages(chunk):
            if kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWCHAIN:
                continue
            a = dict(nftnl.attrs(body))
            if NFTA_CHAIN_HOOK not in a:
                continue  # a regular chain: it may be jumped to from prerouting
            hook = _u32(dict(nftnl.attrs(a[NFTA_CHAIN_HOOK])).get(NFTA_HOOK_HOOKNUM, b""))
            if (family, hook) not in ROUTING_HOOKS:
                late.add((family, a.get(NFTA_CHAIN_TABLE, b""), a.get(NFTA_CHAIN_NAME, b"")))
    restores: set[int] = set()
    other = False
    for chunk in rules:
        for kind, family, body in nftnl.messages(chunk):
            if kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE:
                continue
            a = dict(nftnl.attrs(body))
            if (family, a.get(NFTA_RULE_TABLE, b""), a.get(NFTA_RULE_CHAIN, b"")) in late:
                continue
            r, o = rule_setters(body)
            restores |= r
            other |= o
    for name in ("ip_tables_names", "ip6_tables_names"):
        with contextlib.suppress(OSError):
            other |= "mangle" in (proc / name).read_text().split()
    return MarkSetters(frozenset(restores), other)


def read_mark_setters(opener: nftnl.Opener = nftnl.nf_socket) -> MarkSetters:
    """The running ruleset's mark setters (two netlink dumps)."""
    return mark_setters(nftnl.dump(NFT_MSG_GETCHAIN, opener), nftnl.dump(NFT_MSG_GETRULE, opener))


class Ruleset:
    """The nftables ruleset's mark setters. Alone, they are read again when
    the ruleset's generation changes (a netlink round trip per ask); the
    agent instead hands them in with ``update`` from the dump it takes at
    each change its ruleset watcher reads (offloader/nftwatch.py), and then
    nothing is asked per lookup. Anything that cannot be read counts as
    unknown."""

    def __init__(self, reader: Callable[[], MarkSetters] | None = None,
                 generation: Callable[[], int] | None = None,
                 opener: nftnl.Opener = nftnl.nf_socket) -> None:
        self._opener = opener  # the netlink sockets' namespace: the caller's by default
        self._reader = reader or (lambda: read_mark_setters(opener))
        self._generation: Callable[[], int] | None = generation or self._netlink_generation
        self._sock: socket.socket | None = None
        self._gen: int | None = None
        self._setters = UNKNOWN

    def _netlink_generation(self) -> int:
        if self._sock is None:
            self._sock = self._opener()
        return nftnl.generation(self._sock)

    def update(self, setters: MarkSetters) -> None:
        """The setters as read by whoever watches the ruleset's changes: from
        now on they are what ``setters`` answers until the next update."""
        self._generation = None
        self._setters = setters
        self.close()

    def setters(self) -> MarkSetters:
        if self._generation is None:
            return self._setters
        try:
            gen = self._generation()
            if gen != self._gen:
                self._setters = self._reader()
                self._gen = gen
        except OSError:
            self._gen = None
            self._setters = UNKNOWN
        return self._setters

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
