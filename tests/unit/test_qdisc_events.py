"""Qdisc events (RTMGRP_TC): the watcher reads the qdiscs again, once per
read of the socket, and asks for a re-resolve pass of every offloaded flow
only when what decisions use changed (a shaper's kind on a device, an
ingress qdisc), not when cake-autorate changes cake's rate. The resolver is
the real one over a fake IPRoute; the socket and parser are fakes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from pyroute2.netlink.rtnl import RTM_DELQDISC, RTM_NEWQDISC

from offloader.netwatch import NetWatcher
from offloader.routing import Queueing, Resolver
from tests.unit.fakes import FakeIPRoute, Msg, link


def qdisc(index: int, kind: str, event: int = RTM_NEWQDISC) -> Msg:
    return Msg(index=index, parent=0xFFFFFFFF, TCA_KIND=kind, header={"type": event})


class Sock:
    def __init__(self) -> None:
        self.queued: list[bytes] = []

    def recv(self, _n: int) -> bytes:
        if not self.queued:
            raise BlockingIOError
        return self.queued.pop(0)


def rig() -> tuple[NetWatcher, Resolver, FakeIPRoute, Sock, list[list[Msg]]]:
    ipr = FakeIPRoute([link(2, "lan"), link(3, "wan")], {}, {}, {})
    ipr.qdiscs = [qdisc(2, "noqueue"), qdisc(3, "fq_codel")]
    res = Resolver(ipr)  # type: ignore[arg-type]
    batches: list[list[Msg]] = []  # what each datagram parses to
    parser: Any = SimpleNamespace(marshal=SimpleNamespace(parse=lambda _d: batches.pop(0)))
    sock = Sock()
    return NetWatcher(sock, res, parser), res, ipr, sock, batches  # type: ignore[arg-type]


def events(sock: Sock, batches: list[list[Msg]], *msgs: Msg) -> None:
    sock.queued.append(b"x")
    batches.append(list(msgs))


def test_a_shaper_that_came_starts_a_pass_of_every_flow() -> None:
    w, res, ipr, sock, batches = rig()
    assert res.queueing() == Queueing({}, frozenset())  # fq_codel and noqueue: nobody's
    ipr.qdiscs[1] = qdisc(3, "cake")
    events(sock, batches, qdisc(3, "cake"))
    out = w.read()
    assert out.reresolve.everything and out.paths_moved
    assert res.queueing() == Queueing({3: "cake"}, frozenset())
    assert w.queueing_changes == 1


def test_cake_autorate_changing_the_rate_changes_nothing() -> None:
    w, res, ipr, sock, batches = rig()
    ipr.qdiscs[1] = qdisc(3, "cake")
    res.queueing()
    for _ in range(3):  # tc qdisc change ... cake bandwidth X: the same kind, each time
        events(sock, batches, qdisc(3, "cake"))
        out = w.read()
        assert not out.reresolve and not out.paths_moved
    assert w.queueing_changes == 0 and ipr.qdisc_dumps == 4  # read again each time


def test_a_burst_of_events_is_read_once_and_a_clsact_not_at_all() -> None:
    w, res, ipr, sock, batches = rig()
    res.queueing()
    events(sock, batches, qdisc(2, "clsact"))  # the agent's own attach
    assert not w.read().reresolve and ipr.qdisc_dumps == 1
    ipr.qdiscs += [Msg(index=3, parent=0xFFFFFFF1, TCA_KIND="ingress")]
    events(sock, batches, qdisc(3, "ingress"), qdisc(3, "fq_codel", RTM_DELQDISC),
           qdisc(3, "htb"))
    out = w.read()
    assert out.reresolve.everything and ipr.qdisc_dumps == 2  # one dump for the three
    assert res.queueing() == Queueing({}, frozenset({3}))


def test_lost_events_drop_the_qdiscs_too() -> None:
    w, res, ipr, sock, _ = rig()
    res.queueing()

    def overflow(_n: int) -> bytes:
        raise OSError(105, "No buffer space available")

    sock.recv = overflow  # type: ignore[method-assign]
    assert w.read().reresolve.everything
    ipr.qdiscs[0] = qdisc(2, "tbf")
    assert res.queueing().shapers == {2: "tbf"} and ipr.qdisc_dumps == 2
