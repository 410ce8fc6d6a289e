"""Policy routing: the packet mark from conntrack's mark and the nftables
ruleset, and the resolver's lookups with it.

FAKES, not a real kernel: iptables-nft targets (this machine has no
iptables) are rule messages built byte for byte (tests/unit/nftmsg.py);
the resolver gets the ruleset's answer directly; routes, rules and links
come from tests/unit/fakes.py. What nft rules read back as is checked on
this kernel by tests/datapath/test_policy_nft.py, end to end by
tests/integration/test_multiwan.py.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from offloader.decision import PassReason, unresolved
from offloader.errors import ResolveError
from offloader.policy import ALL_BITS, MarkSetters, Ruleset, mark_setters
from offloader.routing import Resolver
from tests.unit.fakes import FakeIPRoute, Msg, key, link
from tests.unit.nftmsg import chain, expr, nla, rule

INET = 1
ROUTED = MarkSetters(restore_masks=frozenset({ALL_BITS}))  # `meta mark set ct mark`
PER_PACKET = MarkSetters(other=True)  # `meta mark set 0x200`
NOTHING = MarkSetters()


def xt_rules(*targets: bytes, chain: bytes = b"pre") -> list[bytes]:
    return [rule(INET, expr("target", nla(1, t + b"\0")), table=b"mw", chain=chain)
            for t in targets]


def test_iptables_nft_targets() -> None:
    chains = [chain(INET, b"pre", 0, table=b"mw"), chain(INET, b"sub", table=b"mw")]
    xt = mark_setters(chains, xt_rules(b"CONNMARK") + xt_rules(b"MARK", chain=b"sub"))
    assert xt.packet_mark(0x200) == 0x200 and xt.packet_mark(0) is None


def test_a_legacy_mangle_table_may_set_marks(tmp_path: Path) -> None:
    assert mark_setters([], [], proc=tmp_path) == NOTHING
    (tmp_path / "ip6_tables_names").write_text("filter\nmangle\n")
    assert mark_setters([], [], proc=tmp_path).other


def test_ruleset_is_read_again_when_its_generation_changes() -> None:
    reads: list[int] = []
    gen = [1]

    def reader() -> MarkSetters:
        reads.append(gen[0])
        return ROUTED if gen[0] == 1 else PER_PACKET

    rs = Ruleset(reader=reader, generation=lambda: gen[0])
    assert rs.setters().packet_mark(0) == 0 and rs.setters().packet_mark(0) == 0
    assert reads == [1]
    gen[0] = 2
    assert rs.setters().packet_mark(0) is None and reads == [1, 2]


def test_unreadable_ruleset_is_unknown() -> None:
    def broken() -> MarkSetters:
        raise OSError("nftables dump: EPERM")

    assert Ruleset(reader=broken, generation=lambda: 1).setters().packet_mark(0) is None


# -- the resolver with fwmark rules -----------------------------------------------------
FWMARK_RULE = Msg(FRA_FWMARK=0x200, FRA_FWMASK=0x300, FRA_TABLE=102, FRA_PRIORITY=200)
WAN1, WAN2 = ("198.19.10.2", "198.19.20.2")


def multiwan(tmp: Path, setters: MarkSetters, rules: list[Msg]) -> Resolver:
    """lan (2) -> wan1 (3) by the main table, wan2 (4) by table 102 (fwmark 0x200/0x300)."""
    links = [link(2, "lan"), link(3, "wan1"), link(4, "wan2")]
    routes = {"198.19.99.1": {0: (3, WAN1), 0x200: (4, WAN2)}, "198.18.1.3": (2, None)}
    neigh = {(3, WAN1): "bb:00:00:00:00:01", (4, WAN2): "bb:00:00:00:00:02",
             (2, "198.18.1.3"): "aa:00:00:00:00:03"}
    return Resolver(FakeIPRoute(links, routes, neigh, {}, rules=rules),  # type: ignore[arg-type]
                    sysfs=tmp, pppoe_proc=tmp / "none", pppoe_run=tmp,
                    ruleset=Ruleset(reader=lambda: setters, generation=lambda: 1))


def egress(res: Resolver, mark: int) -> int:
    k = key(2, "198.18.1.3", "198.19.99.1")
    return res.resolve(k, ipaddress.ip_address("198.19.99.1"), mark=mark).oif


def test_connection_mark_picks_the_uplink(tmp_path: Path) -> None:
    res = multiwan(tmp_path, ROUTED, [FWMARK_RULE])
    assert egress(res, 0x200) == 4 and egress(res, 0) == 3
    queries = res.ipr.route_queries  # type: ignore[attr-defined]
    assert [q["mark"] for q in queries] == [0x200, 0]
    # Cached by mark: asking again costs no lookup, and the answers stay apart.
    assert egress(res, 0x200) == 4 and egress(res, 0) == 3 and len(queries) == 2


def test_without_fwmark_rules_the_mark_is_not_looked_up(tmp_path: Path) -> None:
    res = multiwan(tmp_path, ROUTED, [Msg(FRA_TABLE=254)])
    assert egress(res, 0x200) == 3 and egress(res, 0) == 3
    assert [q["mark"] for q in res.ipr.route_queries] == [0]  # type: ignore[attr-defined]


def test_unknowable_mark_keeps_the_flow_with_the_kernel(tmp_path: Path) -> None:
    res = multiwan(tmp_path, PER_PACKET, [FWMARK_RULE])
    with pytest.raises(ResolveError, match="packet mark is set per packet") as exc:
        egress(res, 0)
    assert unresolved(exc.value) is PassReason.POLICY_MARK  # what status names for the flow
    # A destination every mark routes alike still goes.
    k = key(2, "198.19.99.1", "198.18.1.3")
    assert res.resolve(k, ipaddress.ip_address("198.18.1.3")).oif == 2


def test_a_tos_rule_that_changes_the_route_keeps_the_flow_with_the_kernel(tmp_path: Path) -> None:
    res = multiwan(tmp_path, NOTHING, [Msg(tos=0x10, FRA_TABLE=102)])
    res.ipr.routes["198.19.99.1"] = {(0, 0x10): (4, WAN2), 0: (3, WAN1)}  # type: ignore[attr-defined]
    with pytest.raises(ResolveError, match="DSCP/TOS") as exc:
        egress(res, 0)
    assert unresolved(exc.value) is PassReason.POLICY_TOS
    k = key(2, "198.19.99.1", "198.18.1.3")
    assert res.resolve(k, ipaddress.ip_address("198.18.1.3")).oif == 2


def test_an_unreachable_path_is_no_path(tmp_path: Path) -> None:
    res = multiwan(tmp_path, NOTHING, [FWMARK_RULE])
    res.ipr.routes["198.51.100.1"] = (0, None)  # type: ignore[attr-defined]  # no output device
    k = key(2, "198.18.1.3", "198.51.100.1")
    with pytest.raises(ResolveError, match="no output device") as exc:
        res.resolve(k, ipaddress.ip_address("198.51.100.1"))
    assert unresolved(exc.value) is PassReason.NO_PATH
