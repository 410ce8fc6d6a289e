"""When a read of the RTNETLINK socket empties the paths cached per host
pair (Decider._paths): only when something a path depends on moved, not
for a neighbour that only aged (offloader/netwatch.py Changes.paths_moved,
offloader/agent.py Agent.apply). The messages are fakes of pyroute2's;
the watcher, the real resolver (over FakeIPRoute) and Agent.apply run."""

from __future__ import annotations

import socket
from types import SimpleNamespace
from typing import Any

from offloader.agent import Agent
from offloader.netwatch import Changes, NetWatcher
from offloader.routing import Resolver
from tests.unit.fakes import FakeIPRoute, key, link
from tests.unit.test_reresolve import Msg

RTM_NEWNEIGH, RTM_DELNEIGH, RTM_NEWROUTE = 28, 29, 24
NUD_REACHABLE, NUD_STALE, NUD_DELAY, NUD_FAILED = 0x02, 0x04, 0x08, 0x20
GW, GW2 = "02:00:00:00:00:99", "02:00:00:00:00:aa"


def neigh(state: int, mac: str | None = GW, kind: int = RTM_NEWNEIGH) -> Msg:
    attrs: dict[str, Any] = {"NDA_DST": "198.19.10.2"}
    if mac:
        attrs["NDA_LLADDR"] = mac
    return Msg(attrs, header={"type": kind}, family=socket.AF_INET, ifindex=3, state=state)


class Paths:
    def __init__(self) -> None:
        self.forgotten = 0

    def forget_paths(self) -> None:
        self.forgotten += 1


def rig() -> tuple[NetWatcher, Resolver, FakeIPRoute]:
    ipr = FakeIPRoute([link(2, "lan"), link(3, "wan")], {"198.19.99.1": (3, "198.19.10.2")},
                      {(3, "198.19.10.2"): GW}, {})
    res = Resolver(ipr)  # type: ignore[arg-type]
    return NetWatcher(None, res, None), res, ipr  # type: ignore[arg-type]


def apply(changes: Changes) -> int:
    """Agent.apply on an agent with nothing but a decider: how often it
    forgot the paths (the changes here ask for nothing else)."""
    paths = Paths()
    Agent.apply(SimpleNamespace(decider=paths), changes)  # type: ignore[arg-type]
    return paths.forgotten


def read(w: NetWatcher, msg: Msg) -> Changes:
    out = Changes()
    w.on_message(msg, out)
    return out


def test_a_neighbour_that_only_ages_keeps_the_paths() -> None:
    w, res, ipr = rig()
    k = key(2, "198.18.1.2", "198.19.99.1")
    assert res.resolve(k, k.dst).l2.dmac == bytes.fromhex(GW.replace(":", ""))
    assert apply(read(w, neigh(NUD_REACHABLE))) == 1  # first seen: its MAC is news
    asked = len(ipr.neigh_queries)
    for state in (NUD_STALE, NUD_DELAY, NUD_REACHABLE, NUD_STALE):
        out = read(w, neigh(state))
        assert not out.paths_moved and not out.macs
        assert apply(out) == 0
    res.resolve(k, k.dst)
    assert len(ipr.neigh_queries) == asked + 1  # forgotten once, on first sight only


def test_a_neighbour_that_moves_appears_or_goes_forgets_the_paths() -> None:
    w, _res, _ipr = rig()
    read(w, neigh(NUD_REACHABLE))
    assert apply(read(w, neigh(NUD_REACHABLE, GW2))) == 1  # another MAC
    assert apply(read(w, neigh(NUD_FAILED, None))) == 1  # no longer valid
    assert apply(read(w, neigh(NUD_FAILED, None))) == 0  # still gone
    assert apply(read(w, neigh(NUD_REACHABLE, GW2))) == 1  # back
    assert apply(read(w, neigh(NUD_STALE, GW2, kind=RTM_DELNEIGH))) == 1


def test_a_route_change_forgets_the_paths() -> None:
    w, _res, _ipr = rig()
    route = Msg({"RTA_DST": "198.19.99.0", "RTA_TABLE": 254}, header={"type": RTM_NEWROUTE},
                family=socket.AF_INET, dst_len=24, flags=0)
    out = read(w, route)
    assert out.paths_moved and out.reresolve


def test_nothing_changed_keeps_the_paths() -> None:
    assert apply(Changes()) == 0
