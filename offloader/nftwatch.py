"""The ruleset watcher: nftables notifications, what the ruleset allows early
drop to learn, and the probation of flows handed back after a change.

``RulesetWatcher.read`` says whether a table that can affect forwarding
changed (the NFNLGRP_NFTABLES group, what ``nft monitor`` reads); ``scan``
dumps the chains and rules once per change and tells both what depends on
them: ``RulesetFacts`` for early drop (notrack, zone, queue rules; the
families conntrack tracks) and the mark setters policy routing needs
(offloader/policy.py). ``Probation`` remembers the
flows handed back after a change, each by the tuple it leaves with, until
the TC egress probe (``ofl_tc_egress``) shows the kernel forwarding one of
its packets: docs/design.md, "The ruleset watcher", says why that proves the
new ruleset still forwards it. Nothing here touches the flow map; the loop
applies what these say.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pyroute2.netlink import NETLINK_NETFILTER
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, NFNLGRP_NFTABLES
from pyroute2.netlink.nfnetlink.nftsocket import (
    NFPROTO_ARP,
    NFPROTO_INET,
    NFPROTO_IPV4,
    NFPROTO_IPV6,
    NFT_MSG_DELCHAIN,
    NFT_MSG_DELFLOWTABLE,
    NFT_MSG_DELOBJ,
    NFT_MSG_DELRULE,
    NFT_MSG_DELSET,
    NFT_MSG_DELSETELEM,
    NFT_MSG_DELTABLE,
    NFT_MSG_GETCHAIN,
    NFT_MSG_GETRULE,
    NFT_MSG_NEWCHAIN,
    NFT_MSG_NEWFLOWTABLE,
    NFT_MSG_NEWGEN,
    NFT_MSG_NEWOBJ,
    NFT_MSG_NEWRULE,
    NFT_MSG_NEWSET,
    NFT_MSG_NEWSETELEM,
    NFT_MSG_NEWTABLE,
)

from . import nftnl, policy
from .datapath import Datapath, probe_key
from .drops import RulesetFacts

log = logging.getLogger(__name__)

SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
READ_BUDGET = 64  # datagrams per wake-up
# Messages that change the ruleset (the DESTROY* variants of newer kernels
# are numbered from 26 on); GET*, NEWGEN and TRACE change nothing.
CHANGES = frozenset({NFT_MSG_NEWTABLE, NFT_MSG_DELTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_DELCHAIN,
                     NFT_MSG_NEWRULE, NFT_MSG_DELRULE, NFT_MSG_NEWSET, NFT_MSG_DELSET,
                     NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM, NFT_MSG_NEWOBJ, NFT_MSG_DELOBJ,
                     NFT_MSG_NEWFLOWTABLE, NFT_MSG_DELFLOWTABLE, *range(26, 33)})
NOT_FORWARDING = frozenset({NFPROTO_ARP})  # arp tables never see IP packets
NEWGEN = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN  # ends every committed transaction

NFTA_CT_KEY, NFTA_CT_SREG, NFT_CT_ZONE = 2, 4, 17
# Expressions (and iptables-nft matches/targets) that make conntrack track a family.
TRACKING = frozenset({"ct", "nat", "masq", "redir", "connlimit", "flow_offload", "ct_expect",
                      "conntrack", "state", "MASQUERADE", "SNAT", "DNAT", "REDIRECT", "CONNMARK"})
NOTRACK = frozenset({"notrack", "CT", "NOTRACK"})  # iptables-nft's CT target may be --notrack
QUEUE = frozenset({"queue", "NFQUEUE"})
FAMILIES = {NFPROTO_INET: (socket.AF_INET, socket.AF_INET6), NFPROTO_IPV4: (socket.AF_INET,),
            NFPROTO_IPV6: (socket.AF_INET6,)}


def is_change(kind: int, family: int) -> bool:
    """A notification of a ruleset change that can affect forwarding."""
    return kind >> 8 == NFNL_SUBSYS_NFTABLES and kind & 0xFF in CHANGES \
        and family not in NOT_FORWARDING


def rule_facts(family: int, body: bytes, out: dict[str, set[int] | bool]) -> None:
    """Fold one rule (an NFT_MSG_NEWRULE body) into ``out``."""
    for name, inner in nftnl.expressions(body):
        if name in NOTRACK:
            out["notrack"] = True
        if name in QUEUE:
            out["queue"] = True
        if (name == "ct" and NFTA_CT_SREG in inner
                and inner.get(NFTA_CT_KEY, b"") == NFT_CT_ZONE.to_bytes(4, "big")):
            out["zones"] = True
        if name in TRACKING:
            tracked = out["tracked"]
            assert isinstance(tracked, set)
            tracked.update(FAMILIES.get(family, ()))


def facts_from_dump(chunks: Iterable[bytes], proc: Path = Path("/proc/net")) -> RulesetFacts:
    """RulesetFacts from the datagrams of an NFT_MSG_GETRULE dump, and the
    legacy iptables tables (invisible to it) listed in /proc/net."""
    out: dict[str, set[int] | bool] = {"tracked": set(), "notrack": False, "zones": False,
                                       "queue": False}
    for chunk in chunks:
        for kind, family, body in nftnl.messages(chunk):
            if kind >> 8 == NFNL_SUBSYS_NFTABLES and kind & 0xFF == NFT_MSG_NEWRULE:
                rule_facts(family, body, out)
    for name, fam in (("ip_tables_names", socket.AF_INET), ("ip6_tables_names", socket.AF_INET6)):
        with contextlib.suppress(OSError):
            tables = (proc / name).read_text().split()
            if "raw" in tables:  # may hold -j CT --notrack
                out["notrack"] = True
            if "nat" in tables:
                tracked = out["tracked"]
                assert isinstance(tracked, set)
                tracked.add(fam)
    tracked = out["tracked"]
    assert isinstance(tracked, set)
    return RulesetFacts(tracked=frozenset(tracked), notrack=bool(out["notrack"]),
                        zones=bool(out["zones"]), queue=bool(out["queue"]))


@dataclass(frozen=True, slots=True)
class Scan:
    """What one read of the ruleset tells the agent."""

    facts: RulesetFacts  # for early drop
    marks: policy.MarkSetters  # for the route lookup of a flow routed by fwmark


SCAN_FAILED = Scan(RulesetFacts(notrack=True), policy.UNKNOWN)


def scan(opener: nftnl.Opener = nftnl.nf_socket) -> Scan:
    """One chain dump and one rule dump, read for early drop and for the mark
    setters at once. Fails safe: a dump that cannot be read allows early
    drop to learn nothing and leaves every mark unknown."""
    try:
        chains = nftnl.dump(NFT_MSG_GETCHAIN, opener)
        rules = nftnl.dump(NFT_MSG_GETRULE, opener)
    except OSError as exc:
        log.warning("reading the nftables ruleset: %s; early drop learns nothing, "
                    "packet marks unknown", exc)
        return SCAN_FAILED
    return Scan(facts_from_dump(rules), policy.mark_setters(chains, rules))


class RulesetWatcher:
    """The NFNLGRP_NFTABLES subscription, and the rule dump on demand."""

    def __init__(self, rcvbuf: int = 1 << 20) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.bind((0, 0))
            self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        self.changes = 0  # changes seen (batches that changed a forwarding table)
        self.overflows = 0
        self._dirty = False  # a change read, its transaction's NEWGEN not yet

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> bool:
        """Whether a transaction that changed a forwarding table has ended
        (its NFT_MSG_NEWGEN read) since the last call; a lost notification
        counts as a change. A large reload spread over several wake-ups is
        one change, not one per wake-up."""
        changed = False
        for _ in range(READ_BUDGET):
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.overflows += 1
                changed = True
                continue
            for kind, fam, _ in nftnl.messages(data):
                if is_change(kind, fam):
                    self._dirty = True
                elif kind == NEWGEN and self._dirty:
                    self._dirty = False
                    changed = True
        self.changes += changed
        return changed

    def scan(self) -> Scan:
        """The ruleset as it is now (``scan``), once per change ``read`` tells."""
        return scan()

    def close(self) -> None:
        self.sock.close()


class Probation:
    """Flows handed back after a ruleset change, by their flow key (raw) and
    the tuple they leave with (the probe key), until proven or gone."""

    def __init__(self) -> None:
        self._by_probe: dict[bytes, bytes] = {}
        self._by_key: dict[bytes, bytes] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def holds(self, raw_key: bytes) -> bool:
        return raw_key in self._by_key

    def put(self, raw_key: bytes, probe: bytes) -> None:
        old = self._by_key.pop(raw_key, None)
        if old is not None:
            self._by_probe.pop(old, None)
        self._by_key[raw_key] = probe
        self._by_probe[probe] = raw_key

    def probes(self) -> list[bytes]:
        return list(self._by_probe)

    def proven(self, seen: Iterable[tuple[bytes, int, int]]) -> list[tuple[bytes, bytes]]:
        """(flow key, probe key) of the flows whose probe saw a packet leave
        after its arm (``seen``: probe key, armed_ns, packets); they leave
        probation."""
        out = []
        for probe, _armed, packets in seen:
            raw_key = self._by_probe.get(probe)
            if packets and raw_key is not None:
                out.append((raw_key, probe))
        for raw_key, probe in out:
            del self._by_key[raw_key]
            del self._by_probe[probe]
        return out

    def forget(self, raw_keys: Iterable[bytes]) -> list[bytes]:
        """These flows went (idle, destroyed): their probe keys, to delete."""
        gone = []
        for raw_key in raw_keys:
            probe = self._by_key.pop(raw_key, None)
            if probe is not None:
                self._by_probe.pop(probe, None)
                gone.append(probe)
        return gone


PROBE_GRACE_NS = 50_000_000  # egress sightings this soon after a ruleset change do not count


def put_on_probation(dp: Datapath, probation: Probation, offload_state: int) -> int:
    """Hand every offloaded flow back (marked pass) on probation: each stays
    with the kernel until the egress probe sees the kernel forward it after
    now. Returns how many."""
    armed = time.monotonic_ns() + PROBE_GRACE_NS
    for probe in probation.probes():  # sightings so far predate this change
        dp.arm_probe(probe, armed)
    n = 0
    for e in dp.flow_entries():
        if e.state != offload_state:
            continue
        probe = probe_key(e.key, e.raw)
        dp.arm_probe(probe, armed)  # before the kernel gets its first packet
        dp.mark_pass(e.key)
        probation.put(e.key.pack(), probe)
        n += 1
    dp.set_probing(bool(probation))
    return n


def end_probation(dp: Datapath, probation: Probation, removed: list[bytes]) -> list[bytes]:
    """Flows gone from the map leave probation; the raw keys of those whose
    probe saw the kernel forward them (to be offloaded again)."""
    for probe in probation.forget(removed):
        dp.probes.delete(probe)
    proven = []
    for raw_key, probe in probation.proven(dp.probes_seen()):
        dp.probes.delete(probe)
        proven.append(raw_key)
    dp.set_probing(bool(probation))
    return proven
