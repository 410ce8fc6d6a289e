"""Shapers on a flow's way in or out (SQM's cake, its ifb redirect): which
hook forwards the flow, decided by Decider.path_of and Decider.tc_only.
The resolver is a fake (tests/unit/test_decider_fastpath.py): its answers
about qdiscs stand for what Resolver.queueing and shaped_on_the_way read
from the kernel (tests/integration/test_shapers.py reads them for real and
has the kernel's own qdiscs count the packets)."""

from __future__ import annotations

import logging

import pytest

from offloader.decision import Decision, PassReason
from offloader.routing import Queueing
from tests.unit.test_decider_fastpath import FakeResolver, decider, settings_udp, udp

LOWEST, UPPER, IIF = 4, 8, 3  # FakeResolver: lowest egress 4, routed device 8; udp() enters by 3


def hybrid(hook: str = "hybrid") -> tuple[object, object, FakeResolver]:
    d, dp = decider(hook_of=lambda i: hook)
    d.settings = settings_udp(hook)
    resolver: FakeResolver = d.resolver  # type: ignore[assignment]
    return d, dp, resolver


def flags_of(d: object, dp: object) -> int:
    return dp.flows.updates[-1][1][d.rec.v_flags]  # type: ignore[attr-defined, no-any-return]


def test_a_shaper_on_the_lowest_device_gets_the_flow_through_tc() -> None:
    """Hybrid: cake on the lowest egress device sees the flow only if TC
    forwards it (TC's redirect goes through the qdisc, XDP's does not)."""
    d, dp, resolver = hybrid()
    resolver.queue = Queueing({LOWEST: "cake"}, frozenset())
    resolver.shaped = (LOWEST, "cake")
    raw, entry = udp(20000)
    assert d.decide(raw, (entry, False)) is Decision.OFFLOAD  # type: ignore[attr-defined]
    assert flags_of(d, dp) & d.rec.flag_tc  # type: ignore[attr-defined]
    assert dp.flows.updates[-1][0] == raw  # type: ignore[attr-defined]
    assert resolver.fulls == [True]  # the XDP path, down to the lowest device


def test_an_ingress_qdisc_on_the_way_in_gets_the_flow_through_tc() -> None:
    """Hybrid: SQM's download shaping is an ``ingress`` qdisc on the WAN
    redirecting to an ifb; XDP would forward the packets before it."""
    d, dp, resolver = hybrid()
    resolver.queue = Queueing({}, frozenset({IIF}))
    raw, entry = udp(20001)
    assert d.decide(raw, (entry, False)) is Decision.OFFLOAD  # type: ignore[attr-defined]
    assert flags_of(d, dp) & d.rec.flag_tc  # type: ignore[attr-defined]


def test_a_shaper_above_the_lowest_device_gets_the_tc_path_into_it() -> None:
    """Hybrid: cake on the routed device (pppoe-wan, wan.7, a DSA user
    port): the flow is resolved as hook tc resolves it, into that device,
    and forwarded by TC through its transmit path, the shaper included."""
    d, dp, resolver = hybrid()
    resolver.queue = Queueing({UPPER: "cake"}, frozenset())
    resolver.shaped = (UPPER, "cake")
    raw, entry = udp(20002)
    assert d.decide(raw, (entry, False)) is Decision.OFFLOAD  # type: ignore[attr-defined]
    assert resolver.fulls == [True, False]
    assert dp.tx_ports.updates[-1][0] == UPPER.to_bytes(4, "little")  # type: ignore[attr-defined]
    assert flags_of(d, dp) & d.rec.flag_tc  # type: ignore[attr-defined]


def test_a_shaper_the_tc_path_does_not_reach_keeps_the_flow_in_the_kernel() -> None:
    """Hybrid: cake on a bridge, whose TC path ends at the port the FDB
    names, below the shaper: only the kernel's path goes through it."""
    d, dp, resolver = hybrid()
    resolver.queue = Queueing({UPPER: "cake"}, frozenset())
    resolver.shaped = (UPPER, "cake")
    resolver.upper_oif = 5  # the bridge port
    raw, entry = udp(20003)
    assert d.decide(raw, (entry, False)) is Decision.PASS  # type: ignore[attr-defined]
    assert d.table.why[raw] is PassReason.SHAPED  # type: ignore[attr-defined]
    assert [k.pack() for k in dp.passed] == [raw]  # type: ignore[attr-defined]
    assert d.counters.passed[PassReason.SHAPED] == 1  # type: ignore[attr-defined]


def test_hook_xdp_offloads_past_a_shaper_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    d, dp, resolver = hybrid("xdp")
    resolver.queue = Queueing({LOWEST: "cake"}, frozenset({IIF}))
    resolver.shaped = (LOWEST, "cake")
    with caplog.at_level(logging.WARNING, logger="offloader.decider"):
        for sport in (20004, 20005):
            raw, entry = udp(sport)
            assert d.decide(raw, (entry, False)) is Decision.OFFLOAD  # type: ignore[attr-defined]
            assert not flags_of(d, dp) & d.rec.flag_tc  # type: ignore[attr-defined]
            d.forget_paths()  # type: ignore[attr-defined]
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2, said  # the shaper and the ingress qdisc, each once
    assert said[0].startswith("cake on if4: hook xdp forwards offloaded flows past it")
    assert said[1].startswith("an ingress qdisc on if3: hook xdp")


@pytest.mark.parametrize("hook", ["tc", "hybrid"])
def test_no_shaper_no_change(hook: str) -> None:
    """Without qdiscs of anybody's (and always with hook tc, whose TC path
    goes through every qdisc on the way) the verdict is the plain one."""
    d, dp, resolver = hybrid(hook)
    resolver.shaped = (UPPER, "cake") if hook == "tc" else None
    raw, entry = udp(20006)
    assert d.decide(raw, (entry, False)) is Decision.OFFLOAD  # type: ignore[attr-defined]
    assert not flags_of(d, dp) & d.rec.flag_tc  # type: ignore[attr-defined]
    assert resolver.fulls == [hook != "tc"]
