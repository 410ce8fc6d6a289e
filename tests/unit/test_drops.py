"""Early drop's judgement, the ruleset facts read from an nftables dump, and
the probation of flows handed back after a ruleset change (all pure)."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest

from offloader.decision import DropReason
from offloader.drops import (
    RulesetFacts,
    Thresholds,
    busiest_sources,
    conntrack_nearly_full,
    drop_lines,
    judge,
)
from offloader.layout import layout
from offloader.nftwatch import Probation, facts_from_dump, is_change
from offloader.routing import RouteLookup
from tests.unit.nftmsg import expr, nla, rule

TH = Thresholds.of(packets=16, after_ms=200, drop_s=30)
MS = 1_000_000
ROUTED = RouteLookup(0, 2, b"\x02" * 6, True)
BRIDGED = RouteLookup(0, 2, b"\x02" * 6, False)


def failing(code: int) -> RouteLookup:
    return RouteLookup(code, 2, b"\x02" * 6, False)


def test_reasons_are_the_header_numbers() -> None:
    for reason in DropReason:
        assert reason.wire == layout().const(f"OFL_DROP_{reason.name}")
    assert len(DropReason) == layout().const("OFL_DROP_REASONS")


@pytest.mark.parametrize("route, packets, age_ms, may_learn, want", [
    (failing(errno.EINVAL), 1, 0, False, DropReason.ROUTE),  # blackhole: at once, always
    (ROUTED, 16, 200, True, DropReason.LEARNED),
    (ROUTED, 15, 10_000, True, None),  # a retry schedule: never 16 packets
    (ROUTED, 1000, 199, True, None),  # a burst: too young
    (ROUTED, 1000, 5000, False, None),  # notrack rule, untracked family, ...
    (BRIDGED, 1000, 5000, True, None),  # bridged, multicast, same segment
    (failing(errno.EHOSTUNREACH), 16, 200, True, DropReason.UNREACHABLE),
    (failing(errno.EACCES), 16, 200, True, DropReason.UNREACHABLE),
    (failing(errno.ENETUNREACH), 16, 200, True, DropReason.UNREACHABLE),
    (failing(errno.EHOSTUNREACH), 5, 5000, True, None),  # the client took the answer
    (failing(errno.ENODEV), 1000, 5000, True, None),  # something else: never
])
def test_judge(route: RouteLookup, packets: int, age_ms: int, may_learn: bool,
               want: DropReason | None) -> None:
    now = 10_000 * MS
    assert judge(route, now - age_ms * MS, packets, now, TH, may_learn) is want


def test_learning_refused_for_what_conntrack_cannot_see() -> None:
    both = frozenset({socket.AF_INET, socket.AF_INET6})
    assert RulesetFacts(tracked=both).refuses(socket.AF_INET) is None
    assert "notrack" in (RulesetFacts(tracked=both, notrack=True).refuses(socket.AF_INET) or "")
    assert RulesetFacts(tracked=both, zones=True).refuses(socket.AF_INET6)
    assert RulesetFacts(tracked=both, queue=True).refuses(socket.AF_INET6)
    v4 = RulesetFacts(tracked=frozenset({socket.AF_INET}))
    assert v4.refuses(socket.AF_INET) is None and v4.refuses(socket.AF_INET6)


def test_conntrack_nearly_full(tmp_path: Path) -> None:
    (tmp_path / "nf_conntrack_max").write_text("1000\n")
    (tmp_path / "nf_conntrack_count").write_text("899\n")
    assert not conntrack_nearly_full(tmp_path)
    (tmp_path / "nf_conntrack_count").write_text("900\n")
    assert conntrack_nearly_full(tmp_path)
    assert not conntrack_nearly_full(tmp_path / "missing")


def test_busiest_sources_count_live_entries_only() -> None:
    rows = [("198.19.2.2", 100, 50, 5000), ("198.19.2.2", 100, 30, 3000),
            ("198.19.2.3", 100, 60, 6000), ("198.19.2.4", 5, 999, 1)]
    got = busiest_sources(rows, now_ns=10)
    assert got == [{"src": "198.19.2.2", "packets": 80, "bytes": 8000, "tuples": 2},
                   {"src": "198.19.2.3", "packets": 60, "bytes": 6000, "tuples": 1}]


def test_drop_lines_for_people() -> None:
    status = {"early_drop": {"packets_by_reason": {"route": 1, "unreachable": 0, "learned": 9},
                             "entries": 2, "entries_max": 4096,
                             "busiest_sources": [{"src": "198.19.2.2", "packets": 10,
                                                  "bytes": 460, "tuples": 2}]},
              "agent": {"drop_learning_off": "a notrack rule exists"}}
    text = "\n".join(drop_lines(status))
    assert "10 packets dropped" in text and "learned 9" in text
    assert "notrack" in text and "198.19.2.2: 10 packets" in text
    assert drop_lines({}) == []


# -- nftables messages, built as the kernel sends them (tests/unit/nftmsg.py) ---------
INET, IP, IP6, ARP = 1, 2, 10, 3


def test_facts_from_a_rule_dump(tmp_path: Path) -> None:
    ct_state = expr("ct", nla(2, (0).to_bytes(4, "big")) + nla(1, (1).to_bytes(4, "big")))
    facts = facts_from_dump([rule(INET, ct_state, expr("immediate"))], proc=tmp_path)
    assert facts == RulesetFacts(tracked=frozenset({socket.AF_INET, socket.AF_INET6}))
    facts = facts_from_dump([rule(IP, expr("masq")), rule(IP6, expr("notrack"))], proc=tmp_path)
    assert facts.tracked == {socket.AF_INET} and facts.notrack
    zone_set = expr("ct", nla(2, (17).to_bytes(4, "big")) + nla(4, (1).to_bytes(4, "big")))
    assert facts_from_dump([rule(INET, zone_set)], proc=tmp_path).zones
    xt_ct = expr("target", nla(1, b"CT\0"))
    assert facts_from_dump([rule(IP, xt_ct)], proc=tmp_path).notrack
    assert facts_from_dump([rule(IP, expr("queue"))], proc=tmp_path).queue
    (tmp_path / "ip_tables_names").write_text("raw\nnat\n")
    legacy = facts_from_dump([], proc=tmp_path)
    assert legacy.notrack and legacy.tracked == {socket.AF_INET}


def test_which_notifications_are_changes() -> None:
    nft = 10 << 8
    assert is_change(nft | 6, INET)  # NEWRULE
    assert is_change(nft | 12, IP)  # NEWSETELEM
    assert is_change(nft | 28, IP6)  # DESTROYRULE
    assert not is_change(nft | 15, INET)  # NEWGEN ends every batch
    assert not is_change(nft | 7, INET)  # GETRULE
    assert not is_change(nft | 6, ARP)
    assert not is_change((1 << 8) | 0, INET)  # conntrack, not nftables


def test_probation() -> None:
    p = Probation()
    p.put(b"k1", b"p1")
    p.put(b"k2", b"p2")
    p.put(b"k1", b"p1")  # handed back again: still one entry
    assert len(p) == 2 and p.holds(b"k1") and sorted(p.probes()) == [b"p1", b"p2"]
    assert p.proven([(b"p1", 5, 0), (b"p2", 5, 3), (b"other", 5, 9)]) == [(b"k2", b"p2")]
    assert not p.holds(b"k2") and p.holds(b"k1")
    assert p.forget([b"k1", b"k9"]) == [b"p1"]
    assert len(p) == 0
