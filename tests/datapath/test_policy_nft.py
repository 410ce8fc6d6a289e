"""The packet mark before routing, read from rulesets the kernel holds: each
case loads its rules with `nft -f` into a namespace of its own and reads
them back the way the agent does (chain and rule dumps over netlink,
offloader/nftnl.py), so what is checked is the kernel's own form of each
rule (registers, bitwise, meta set), not a hand-written copy of it.
iptables-nft targets need iptables, which this machine lacks: those are
tests/unit/test_policy.py's, built byte for byte.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence

import pytest
from pyroute2.netlink import NETLINK_NETFILTER

from offloader import nftwatch, policy
from tests import nsutil
from tests.nsutil import Netns

pytestmark = pytest.mark.root

PRE = "type filter hook prerouting priority mangle; policy accept;"
PIN_HOST2 = "ip saddr 198.18.1.3 ct mark set 0x200"  # marks the connection, not the packet
RESTORE = "meta mark set ct mark"


@pytest.fixture(scope="module")
def ns(bpf_object: object) -> Iterator[Netns]:  # bpf_object: needs root, as the rest here
    with nsutil.namespaces("pol") as (n,):
        yield n


def opener(ns: Netns) -> policy.nftnl.Opener:
    """nftnl.nf_socket's socket, made in ``ns``: non-blocking, as the agent's."""
    def make() -> socket.socket:
        s = nsutil.socket_in(ns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        s.setblocking(False)
        return s
    return make


def load(ns: Netns, pre: Sequence[str] = (), sub: Sequence[str] = (), extra: str = "") -> None:
    """One table: base chain `pre` at prerouting, regular chain `sub`, plus ``extra``."""
    lines = "\n".join(["flush ruleset", "table inet mw {", f"chain pre {{ {PRE}",
                       *pre, "}", "chain sub {", *sub, "}", "}", extra])
    ns.run("nft -f -", input=lines + "\n")


def setters(ns: Netns) -> policy.MarkSetters:
    return policy.read_mark_setters(opener(ns))


def test_no_mark_setter_routes_with_mark_zero(ns: Netns) -> None:
    load(ns, pre=[PIN_HOST2])
    s = setters(ns)
    assert s == policy.MarkSetters() and s.packet_mark(0x200) == 0


def test_restore_gives_the_connection_mark(ns: Netns) -> None:
    load(ns, pre=[PIN_HOST2, RESTORE])
    s = setters(ns)
    assert s.packet_mark(0x200) == 0x200 and s.packet_mark(0) == 0
    load(ns, pre=["meta mark set ct mark and 0x3f00"])
    assert setters(ns).packet_mark(0x12345) == 0x2300


def test_per_packet_setter_leaves_unmarked_connections_unknown(ns: Netns) -> None:
    load(ns, pre=[RESTORE], sub=["meta mark set 0x200"])  # a regular chain may be jumped to
    s = setters(ns)
    assert s.packet_mark(0) is None
    assert s.packet_mark(0x100) == 0x100  # set once and restored: mwan3's pattern
    load(ns, sub=["meta mark set 0x200"])
    assert setters(ns).packet_mark(0x100) is None  # nothing restores


@pytest.mark.parametrize("rule", [
    "meta mark set ct mark or 0x1",  # a bitwise with a non-zero xor: not a plain restore
    "meta mark set meta mark and 0xff",  # the packet's own mark, not the connection's
    "meta mark set ip saddr map { 198.18.1.3 : 0x200 }",  # pbr's pattern
    "ct mark 0x200 meta mark set 0x5",  # the ct load feeds a match; the set is a constant
])
def test_a_mark_from_anything_but_the_connection_mark_is_other(ns: Netns, rule: str) -> None:
    load(ns, pre=[rule])
    s = setters(ns)
    assert s.other and not s.restore_masks, s


def test_a_restore_among_other_statements_is_still_a_restore(ns: Netns) -> None:
    load(ns, pre=["ip saddr 198.18.1.3 meta mark set ct mark and 0xff00 ct mark set 0x1 counter"])
    assert setters(ns) == policy.MarkSetters(restore_masks=frozenset({0xFF00}))


def test_marks_set_after_routing_do_not_count(ns: Netns) -> None:
    late = "\n".join(f"table inet late {{\nchain {hook} {{\ntype filter hook {hook} priority 0;\n"
                     f"meta mark set 0x{i + 1:x}\n}}\n}}"
                     for i, hook in enumerate(("input", "forward", "output", "postrouting")))
    load(ns, extra=late)
    assert setters(ns) == policy.MarkSetters()
    load(ns, extra="table netdev early {\nchain c {\ntype filter hook ingress device lo priority 0;\n"
                   "meta mark set 0x7\n}\n}")
    assert setters(ns).other  # netdev ingress runs before routing


def test_restores_under_different_masks_are_unknown(ns: Netns) -> None:
    load(ns, pre=[RESTORE], sub=["meta mark set ct mark and 0xff"])
    assert setters(ns).packet_mark(0x200) is None


def test_the_agents_view_follows_the_ruleset_generation(ns: Netns) -> None:
    load(ns, pre=[RESTORE])
    rs = policy.Ruleset(opener=opener(ns))
    try:
        assert rs.setters().packet_mark(0x200) == 0x200
        load(ns, pre=["meta mark set 0x7"])  # a new generation
        assert rs.setters().packet_mark(0) is None
    finally:
        rs.close()


def test_the_agents_scan_reads_early_drops_facts_and_the_marks_from_one_dump(
        ns: Netns) -> None:
    # What the agent reads at each change its ruleset watcher tells: both
    # answers come from the same chain and rule dumps, and the mark setters
    # are then handed to the resolver's Ruleset, which asks nothing more.
    load(ns, pre=[RESTORE], extra="table ip raw {\nchain pre {\n"
                                  "type filter hook prerouting priority raw;\n"
                                  "udp dport 9 notrack\n}\n}")
    found = nftwatch.scan(opener(ns))
    assert found.marks == policy.MarkSetters(restore_masks=frozenset({policy.ALL_BITS}))
    assert found.facts.notrack and found.facts.refuses(socket.AF_INET)
    asked: list[int] = []
    rs = policy.Ruleset(reader=lambda: policy.UNKNOWN, generation=lambda: asked.append(1) or 1)
    rs.update(found.marks)
    assert rs.setters().packet_mark(0x200) == 0x200 and asked == []
    load(ns, pre=["meta mark set 0x7"])  # the next change, the next scan
    rs.update(nftwatch.scan(opener(ns)).marks)
    assert rs.setters().packet_mark(0) is None


def test_a_ruleset_too_big_for_one_datagram_is_read_whole(ns: Netns) -> None:
    # fw4 on a busy router: thousands of rules, a dump of many datagrams, read
    # with a non-blocking socket (each part is made inside the read before it).
    many = [f"ip saddr 198.18.{i // 250}.{i % 250 + 1} counter accept" for i in range(3000)]
    load(ns, pre=[*many, "meta mark set ct mark and 0xff"])
    chunks = policy.nftnl.dump(policy.NFT_MSG_GETRULE, opener(ns))
    assert len(chunks) > 2
    assert setters(ns) == policy.MarkSetters(restore_masks=frozenset({0xFF}))
