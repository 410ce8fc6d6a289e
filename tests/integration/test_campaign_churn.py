"""Churn (docs/reliability.md), each during its own offloaded TCP transfer:
the agent converges within a few sweeps (the time is reported), nothing is
black-holed, and the bytes arrive intact, or the connection fails as it
would without the agent (address removed; a new connection while
nf_conntrack_max is reached)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from offloader.lab import Topology

from .campaign import churn, zones_and_helpers

pytestmark = pytest.mark.root


def _check(cases: list[dict[str, Any]]) -> None:
    print(json.dumps(cases, indent=1))
    for case in cases:
        assert case["offloaded_before"], case
        assert case["converged"], case
        assert case["as_expected"], case


def test_route_neighbour_link_flush_and_address_changes(lab: Topology) -> None:
    cases = churn(lab)
    assert [c["case"] for c in cases] == [
        "route change to another next hop", "neighbour MAC change", "link down and up",
        "conntrack -F", "address removed", "nf_conntrack_max reached"]
    _check(cases)


def test_zones_and_helpers(lab: Topology) -> None:
    zoned, helped = zones_and_helpers(lab)
    assert zoned["entry_in_zone_7"], zoned
    _check([zoned])
    # The helper's connection stays with the kernel: never offloaded.
    assert helped["kernel_helper"] and helped["passed_helper"] >= 1, helped
    assert not helped["ever_offloaded"] and "offloaded" not in helped["states"], helped
    assert helped["converged"] and helped["intact"], helped
