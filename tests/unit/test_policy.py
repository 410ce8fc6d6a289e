"""Policy routing: the packet mark from conntrack's mark and the nftables
ruleset, and the resolver's lookups with it.

FAKES, not a real kernel: rulesets are `nft -j list ruleset` output written
by hand after what nft 1.0 prints for the rules named in each test; routes,
rules and links come from tests/unit/fakes.py. The end-to-end proof on this
kernel is tests/integration/test_multiwan.py.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from offloader.decision import PassReason, unresolved
from offloader.errors import ResolveError
from offloader.policy import MarkSetters, Ruleset, mark_setters
from offloader.routing import Resolver
from tests.unit.fakes import FakeIPRoute, Msg, key, link

CT_MARK = {"ct": {"key": "mark"}}
META_MARK = {"meta": {"key": "mark"}}


def ruleset(*rules: tuple[str, list[dict[str, Any]]], hook: str = "prerouting") -> dict[str, Any]:
    """One table with a base chain ``pre`` at ``hook``, a base chain ``post``
    at postrouting and a regular chain ``sub``; rules as (chain, statements)."""
    items: list[dict[str, Any]] = [
        {"metainfo": {"json_schema_version": 1}},
        {"table": {"family": "inet", "name": "mw", "handle": 1}},
        {"chain": {"family": "inet", "table": "mw", "name": "pre", "handle": 1, "type": "filter",
                   "hook": hook, "prio": -150, "policy": "accept"}},
        {"chain": {"family": "inet", "table": "mw", "name": "post", "handle": 2, "type": "filter",
                   "hook": "postrouting", "prio": -150, "policy": "accept"}},
        {"chain": {"family": "inet", "table": "mw", "name": "sub", "handle": 3}},
    ]
    for chain, expr in rules:
        items.append({"rule": {"family": "inet", "table": "mw", "chain": chain, "expr": expr}})
    return {"nftables": items}


def set_meta_mark(value: Any) -> dict[str, Any]:
    return {"mangle": {"key": META_MARK, "value": value}}


PIN_HOST2 = ("pre", [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                                "right": "198.18.1.3"}},
                     {"mangle": {"key": CT_MARK, "value": 0x200}}])
RESTORE = ("pre", [set_meta_mark(CT_MARK)])


def test_no_mark_setter_routes_with_mark_zero() -> None:
    s = mark_setters(ruleset(PIN_HOST2))  # a connection mark nothing restores
    assert s == MarkSetters()
    assert s.packet_mark(0x200) == 0


def test_restore_gives_the_connection_mark() -> None:
    s = mark_setters(ruleset(PIN_HOST2, RESTORE))
    assert s.packet_mark(0x200) == 0x200 and s.packet_mark(0) == 0
    masked = mark_setters(ruleset(("pre", [set_meta_mark({"&": [CT_MARK, 0x3F00]})])))
    assert masked.packet_mark(0x12345) == 0x2300


def test_per_packet_setter_leaves_unmarked_connections_unknown() -> None:
    per_packet = ("sub", [set_meta_mark(0x200)])  # a regular chain may be jumped to
    s = mark_setters(ruleset(per_packet, RESTORE))
    assert s.packet_mark(0) is None
    assert s.packet_mark(0x100) == 0x100  # set once and restored: mwan3's pattern
    assert mark_setters(ruleset(per_packet)).packet_mark(0x100) is None  # nothing restores


def test_marks_set_after_routing_do_not_count() -> None:
    assert mark_setters(ruleset(("post", [set_meta_mark(0x200)]))).packet_mark(0) == 0
    assert mark_setters(ruleset(("pre", [set_meta_mark(0x200)]), hook="output")).packet_mark(0) == 0
    assert mark_setters(ruleset(("pre", [set_meta_mark(0x200)]), hook="ingress")).other


def test_iptables_nft_targets() -> None:
    xt = mark_setters(ruleset(("pre", [{"xt": {"type": "target", "name": "CONNMARK"}}]),
                              ("sub", [{"xt": {"type": "target", "name": "MARK"}}])))
    assert xt.packet_mark(0x200) == 0x200 and xt.packet_mark(0) is None


def test_restores_under_different_masks_are_unknown() -> None:
    s = mark_setters(ruleset(RESTORE, ("sub", [set_meta_mark({"&": [CT_MARK, 0xFF]})])))
    assert s.packet_mark(0x200) is None


def test_ruleset_is_read_again_when_its_generation_changes() -> None:
    reads: list[int] = []
    gen = [1]

    def reader() -> dict[str, Any]:
        reads.append(gen[0])
        return ruleset(RESTORE) if gen[0] == 1 else ruleset(("pre", [set_meta_mark(7)]))

    rs = Ruleset(reader=reader, generation=lambda: gen[0])
    assert rs.setters().packet_mark(0) == 0 and rs.setters().packet_mark(0) == 0
    assert reads == [1]
    gen[0] = 2
    assert rs.setters().packet_mark(0) is None and reads == [1, 2]


def test_unreadable_ruleset_is_unknown() -> None:
    def broken() -> dict[str, Any]:
        raise OSError("no nft")

    assert Ruleset(reader=broken, generation=lambda: 1).setters().packet_mark(0) is None


# -- the resolver with fwmark rules -----------------------------------------------------
FWMARK_RULE = Msg(FRA_FWMARK=0x200, FRA_FWMASK=0x300, FRA_TABLE=102, FRA_PRIORITY=200)
WAN1, WAN2 = ("198.19.10.2", "198.19.20.2")


def multiwan(tmp: Path, setters: dict[str, Any], rules: list[Msg]) -> Resolver:
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
    res = multiwan(tmp_path, ruleset(PIN_HOST2, RESTORE), [FWMARK_RULE])
    assert egress(res, 0x200) == 4 and egress(res, 0) == 3
    queries = res.ipr.route_queries  # type: ignore[attr-defined]
    assert [q["mark"] for q in queries] == [0x200, 0]
    # Cached by mark: asking again costs no lookup, and the answers stay apart.
    assert egress(res, 0x200) == 4 and egress(res, 0) == 3 and len(queries) == 2


def test_without_fwmark_rules_the_mark_is_not_looked_up(tmp_path: Path) -> None:
    res = multiwan(tmp_path, ruleset(PIN_HOST2, RESTORE), [Msg(FRA_TABLE=254)])
    assert egress(res, 0x200) == 3 and egress(res, 0) == 3
    assert [q["mark"] for q in res.ipr.route_queries] == [0]  # type: ignore[attr-defined]


def test_unknowable_mark_keeps_the_flow_with_the_kernel(tmp_path: Path) -> None:
    per_packet = ruleset(("pre", [set_meta_mark(0x200)]))
    res = multiwan(tmp_path, per_packet, [FWMARK_RULE])
    with pytest.raises(ResolveError, match="packet mark is set per packet") as exc:
        egress(res, 0)
    assert unresolved(exc.value) is PassReason.POLICY_MARK  # what status names for the flow
    # A destination every mark routes alike still goes.
    k = key(2, "198.19.99.1", "198.18.1.3")
    assert res.resolve(k, ipaddress.ip_address("198.18.1.3")).oif == 2


def test_a_tos_rule_that_changes_the_route_keeps_the_flow_with_the_kernel(tmp_path: Path) -> None:
    res = multiwan(tmp_path, ruleset(), [Msg(tos=0x10, FRA_TABLE=102)])
    res.ipr.routes["198.19.99.1"] = {(0, 0x10): (4, WAN2), 0: (3, WAN1)}  # type: ignore[attr-defined]
    with pytest.raises(ResolveError, match="DSCP/TOS") as exc:
        egress(res, 0)
    assert unresolved(exc.value) is PassReason.POLICY_TOS
    k = key(2, "198.19.99.1", "198.18.1.3")
    assert res.resolve(k, ipaddress.ip_address("198.18.1.3")).oif == 2


def test_an_unreachable_path_is_no_path(tmp_path: Path) -> None:
    res = multiwan(tmp_path, ruleset(), [FWMARK_RULE])
    res.ipr.routes["198.51.100.1"] = (0, None)  # type: ignore[attr-defined]  # no output device
    k = key(2, "198.18.1.3", "198.51.100.1")
    with pytest.raises(ResolveError, match="no output device") as exc:
        res.resolve(k, ipaddress.ip_address("198.51.100.1"))
    assert unresolved(exc.value) is PassReason.NO_PATH
