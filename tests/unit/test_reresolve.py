"""The re-resolve pass without root: which flows a route or rule change
selects, the slices a pass is cut into, how changes coalesce, and the
verdict read back from an entry (offloader/reresolve.py, netwatch.py)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from offloader.datapath import FlowKey, L2Header, Verdict
from offloader.layout import layout
from offloader.netwatch import Changes, NetWatcher
from offloader.records import Records
from offloader.reresolve import (
    Lookup,
    Offsets,
    Pass,
    Rerouter,
    Scope,
    Selector,
    route_selector,
    rule_selector,
)
from offloader.routing import Egress

V4 = socket.AF_INET


class Msg(dict[str, Any]):
    """An RTNETLINK message as pyroute2 gives it: header fields by key,
    attributes by get()."""

    def __init__(self, attrs: dict[str, Any], **fields: Any) -> None:
        super().__init__(fields, attrs=list(attrs.items()))
        self._attrs = attrs

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return self._attrs.get(name, super().get(name, default))


def word(addr: str) -> int:
    ip = ipaddress.ip_address(addr)
    return int(ip) << (96 if ip.version == 4 else 0)


def flow(dst: str, *, src: str = "198.18.1.2", nat_src: str = "", mark: int | None = 0,
         iif: str = "br-lan", proto: int = 6, sport: int = 40000, dport: int = 443) -> Lookup:
    return Lookup(V4, word(src), word(dst), word(nat_src or src), proto, sport, dport, mark,
                  lambda: iif)


def route(dst: str | None, dst_len: int, family: int = V4) -> Msg:
    return Msg({"RTA_DST": dst, "RTA_TABLE": 254} if dst else {"RTA_TABLE": 254},
               family=family, dst_len=dst_len, flags=0)


def rule(attrs: dict[str, Any], *, dst_len: int = 0, src_len: int = 0, flags: int = 0) -> Msg:
    base = {"FRA_PRIORITY": 300, "FRA_TABLE": 102, "FRA_PROTOCOL": 0}
    return Msg({**base, **attrs}, family=V4, dst_len=dst_len, src_len=src_len, tos=0,
               flags=flags, action=1)


# -- which flows a change selects ----------------------------------------------------
def test_a_route_selects_the_destinations_inside_its_prefix() -> None:
    sel = route_selector(route("198.19.99.0", 24))
    assert sel.matches(flow("198.19.99.7"))
    assert not sel.matches(flow("198.19.98.7"))
    assert not sel.matches(flow("198.19.99.7")._replace(family=socket.AF_INET6))
    default = route_selector(route(None, 0))
    assert default.matches(flow("8.8.8.8")) and default.matches(flow("198.19.98.7"))


def test_an_ipv6_route_prefix() -> None:
    sel = route_selector(route("2001:db8:1::", 48, socket.AF_INET6))
    inside = Lookup(socket.AF_INET6, word("2001:db8::1"), word("2001:db8:1:2::9"),
                    word("2001:db8::1"), 6, 1, 2, 0, lambda: None)
    assert sel.matches(inside)
    assert not sel.matches(inside._replace(dst=word("2001:db8:2::9")))


def test_a_rule_selects_by_source_destination_mark_ports_and_input_device() -> None:
    sel = rule_selector(rule({"FRA_SRC": "198.18.1.2", "FRA_DST": "198.19.99.1"},
                             src_len=32, dst_len=32))
    assert sel is not None
    assert sel.matches(flow("198.19.99.1"))
    assert not sel.matches(flow("198.19.99.1", src="198.18.1.3"))
    assert not sel.matches(flow("198.19.99.2"))

    marked = rule_selector(rule({"FRA_FWMARK": 0x200, "FRA_FWMASK": 0x300}))
    assert marked is not None
    assert marked.matches(flow("1.1.1.1", mark=0x200)) and marked.matches(flow("1.1.1.1", mark=0x2ff))
    assert not marked.matches(flow("1.1.1.1", mark=0x100))
    assert marked.matches(flow("1.1.1.1", mark=None))  # unknown packet mark: may match

    ports = rule_selector(rule({"FRA_IP_PROTO": 17, "FRA_DPORT_RANGE": "53:53"}))
    assert ports is not None
    assert ports.matches(flow("1.1.1.1", proto=17, dport=53))
    assert not ports.matches(flow("1.1.1.1", proto=17, dport=54))
    assert not ports.matches(flow("1.1.1.1", proto=6, dport=53))

    iif = rule_selector(rule({"FRA_IIFNAME": "wan2"}))
    assert iif is not None
    assert not iif.matches(flow("1.1.1.1")) and iif.matches(flow("1.1.1.1", iif="wan2"))


def test_rules_it_cannot_narrow_select_every_flow() -> None:
    assert rule_selector(rule({"FRA_SRC": "10.0.0.0"}, src_len=8, flags=0x2)) is None  # not ...
    assert rule_selector(rule({"FRA_UID_RANGE": "0:100"})) is None
    assert rule_selector(rule({"FRA_OIFNAME": "wan1"})) is None
    everything = Scope()
    everything.add(route_selector(route("10.0.0.0", 8)))
    everything.add(None)
    assert everything.everything and everything.matches(flow("198.19.99.1"))


def test_a_scope_is_the_union_of_its_changes() -> None:
    scope = Scope()
    assert not scope
    scope.add(route_selector(route("198.19.99.0", 24)))
    scope.add(route_selector(route("198.19.99.0", 24)))  # the same twice: kept once
    scope.add(route_selector(route("10.0.0.0", 8)))
    assert len(scope.selectors) == 2
    assert scope.matches(flow("10.1.2.3")) and scope.matches(flow("198.19.99.9"))
    assert not scope.matches(flow("198.19.98.9"))
    many = Scope()
    for i in range(100):
        many.add(Selector(V4, dst=(word(f"10.0.{i}.0"), word("255.255.255.0"))))
    assert many.everything  # bounded: beyond SELECTORS_KEPT, everything


# -- the pass: slices and coalescing -------------------------------------------------------
OFF = Offsets()


def entry(i: int, *, offloaded: bool = True) -> tuple[bytes, bytes]:
    key = FlowKey(ifindex=2, family=V4, proto=6, src=ipaddress.ip_address("198.18.1.2"),
                  dst=ipaddress.ip_address(int(ipaddress.ip_address("198.19.0.0")) + i),
                  sport=1000 + i % 60000, dport=443)
    v = Verdict(oif=3, l2=L2Header(dmac=b"\x02" * 6, smac=b"\x04" * 6), mtu=1500, key=key)
    return key.pack(), v.pack(state=None if offloaded else 2)


class FakeMap:
    def __init__(self, n: int) -> None:
        self.entries = [entry(i) for i in range(n)]
        self.walks = 0

    def batches(self) -> Iterator[tuple[bytes, bytes, int]]:
        self.walks += 1
        for at in range(0, len(self.entries), 100):
            chunk = self.entries[at : at + 100]
            yield b"".join(k for k, _ in chunk), b"".join(v for _, v in chunk), len(chunk)


class Clock:
    """Each reading advances 1 ms: a slice of a 5 ms budget reads a few."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 0.001
        return self.t


def lookups() -> Any:
    return lambda k, v: OFF.lookup(k, v, lambda m: m, lambda: "br-lan")


def make_pass(m: FakeMap, judged: list[bytes], verdict: bool | None = True) -> tuple[Pass, list[Any]]:
    done: list[Any] = []

    def judge(k: bytes, v: bytes) -> bool | None:
        judged.append(k)
        return verdict

    return Pass(m.batches, judge, lookups, done.append, clock=Clock()), done


def test_a_pass_is_cut_into_bounded_slices_and_sees_each_flow_once() -> None:
    m, judged = FakeMap(1000), []
    p, done = make_pass(m, judged)
    everything = Scope()
    everything.add(None)
    p.wanted(everything)
    steps = 0
    while p.step():
        steps += 1
        assert steps < 10_000
    assert len(judged) == len(set(judged)) == 1000
    assert steps > 10  # not in one go
    assert len(done) == 1 and done[0].checked == 1000 and done[0].kept == 1000
    assert not p.busy and not p.step()  # idle: nothing to do


def test_only_offloaded_flows_in_scope_are_judged() -> None:
    m, judged = FakeMap(300), []
    m.entries[5] = entry(5, offloaded=False)  # a pass entry
    p, done = make_pass(m, judged, verdict=None)
    scope = Scope()
    scope.add(route_selector(route("198.19.0.0", 28)))  # flows 0..15
    p.wanted(scope)
    while p.step():
        pass
    assert sorted(judged) == sorted(m.entries[i][0] for i in range(16) if i != 5)
    assert done[0].torn_down == 15 and done[0].kept == 0


def test_a_closing_flow_is_left_to_the_sweep() -> None:
    # The datapath saw a FIN (or RST) on flow 3 and passes the rest of it
    # already; a route change over it neither judges it nor counts it.
    m, judged = FakeMap(10), []
    k, v = m.entries[3]
    for flag in ("OFL_SEEN_FIN", "OFL_SEEN_RST"):
        seen = (int.from_bytes(v[OFF.f_seen : OFF.f_seen + 4], "little")
                | layout().const(flag)).to_bytes(4, "little")
        m.entries[3] = (k, v[: OFF.f_seen] + seen + v[OFF.f_seen + 4 :])
        judged.clear()
        p, done = make_pass(m, judged, verdict=None)
        everything = Scope()
        everything.add(None)
        p.wanted(everything)
        while p.step():
            pass
        assert k not in judged and len(judged) == 9
        assert done[0].checked == 9 and done[0].torn_down == 9


def test_changes_during_a_pass_queue_one_more_pass() -> None:
    m, judged = FakeMap(1000), []
    p, done = make_pass(m, judged)
    every = Scope()
    every.add(None)
    p.wanted(every)
    assert p.step()
    for _ in range(5):  # a burst while the first pass runs
        p.wanted(every)
        p.step()
    while p.step():
        pass
    assert len(done) == 2 and m.walks == 2  # the burst cost one pass more, not five
    assert len(judged) == 2000


def test_a_burst_before_the_first_slice_is_one_pass() -> None:
    m, judged = FakeMap(200), []
    p, done = make_pass(m, judged)
    for net in ("198.19.0.0", "198.19.0.64", "198.19.0.128"):
        scope = Scope()
        scope.add(route_selector(route(net, 26)))
        p.wanted(scope)
    while p.step():
        pass
    assert len(done) == 1 and sorted(judged) == sorted(k for k, _ in m.entries[:192])


def test_a_flow_whose_judging_fails_does_not_stop_the_pass() -> None:
    from offloader.errors import OffloadError

    m = FakeMap(50)

    def judge(k: bytes, v: bytes) -> bool | None:
        raise OffloadError("broken")

    done: list[Any] = []
    p = Pass(m.batches, judge, lookups, done.append, clock=Clock())
    every = Scope()
    every.add(None)
    p.wanted(every)
    for _ in range(1000):
        if not p.step():
            break
    assert len(done) == 1 and done[0].checked == 50


# -- the verdict read back -------------------------------------------------------------
@pytest.mark.parametrize("nat", [False, True])
def test_a_verdict_reads_back_as_written(nat: bool) -> None:
    key = FlowKey(ifindex=7, family=V4, proto=17, src=ipaddress.ip_address("198.18.1.2"),
                  dst=ipaddress.ip_address("198.19.99.1"), sport=5000, dport=53)
    v = Verdict(oif=9, l2=L2Header(dmac=bytes(range(6)), smac=bytes(range(6, 12)),
                                   vlans=((0x88A8, 100), (0x8100, 7)), pppoe_sid=0x1234,
                                   dsa_proto=1, dsa_port=3),
                mtu=1492, key=key, reply=True, zone=4, mark=0x200, assured=True,
                **({"nat_src": ipaddress.ip_address("198.19.10.1"), "nat_sport": 61000,
                    "nat_dst": ipaddress.ip_address("198.18.1.9"), "nat_dport": 5353}
                   if nat else {}))
    back = Verdict.unpack(key, v.pack())
    assert back == v
    assert back.pack() == v.pack()


# -- netwatch: which changes ask for a pass --------------------------------------------------
class Link:
    def __init__(self, kind: str, lower: int) -> None:
        self.kind, self.lower = kind, lower


class Resolver:
    def __init__(self, links: list[Link] | None = None) -> None:
        self.forgot: list[dict[str, bool]] = []
        self._links = links or []

    def links(self) -> list[Link]:
        return self._links

    def local_addresses(self) -> dict[Any, int]:
        return {ipaddress.ip_address("198.19.10.1"): 5}

    def forget(self, **kw: bool) -> None:
        self.forgot.append(kw)

    def forget_routes_to(self, inside: Any) -> None:
        self.forgot.append({"routes_to": inside})

    def forget_queueing(self) -> None:
        self.forgot.append({"qdiscs": True})


class Sock:
    def __init__(self, error: OSError | None = None) -> None:
        self.error = error

    def recv(self, n: int) -> bytes:
        raise self.error or BlockingIOError()


def watcher(sock: Sock | None = None, links: list[Link] | None = None
            ) -> tuple[NetWatcher, Resolver]:
    res = Resolver(links)
    return NetWatcher(sock or Sock(), res, None), res  # type: ignore[arg-type]


def test_a_route_change_asks_for_its_prefix_only() -> None:
    w, res = watcher()
    out = Changes()
    w.on_message(Msg({"RTA_DST": "198.19.99.0", "RTA_TABLE": 254},
                     header={"type": 24}, family=V4, dst_len=24, flags=0), out)  # RTM_NEWROUTE
    assert out.reresolve and not out.reresolve.everything
    assert out.reresolve.matches(flow("198.19.99.3")) and not out.reresolve.matches(flow("1.1.1.1"))
    # Only the cached lookups of destinations inside the prefix go.
    (forgot,) = res.forgot
    inside = forgot["routes_to"]
    assert inside(ipaddress.ip_address("198.19.99.3"))
    assert not inside(ipaddress.ip_address("198.19.98.3"))
    assert not inside(ipaddress.ip_address("2001:db8::1"))


def test_a_route_change_keeps_the_cached_lookups_outside_its_prefix() -> None:
    from offloader.routing import Resolver as RealResolver
    from tests.unit.fakes import FakeIPRoute, key, link

    ipr = FakeIPRoute([link(2, "lan"), link(3, "wan")],
                      {"198.19.99.1": (3, "198.19.10.2"), "198.19.98.1": (3, "198.19.10.2")},
                      {(3, "198.19.10.2"): "02:00:00:00:00:99"}, {})
    res = RealResolver(ipr)  # type: ignore[arg-type]
    near, far = key(2, "198.18.1.2", "198.19.99.1"), key(2, "198.18.1.2", "198.19.98.1")
    for k in (near, far):
        res.resolve(k, k.dst)
    asked = len(ipr.route_queries)
    res.forget_routes_to(route_selector(route("198.19.99.0", 24)).covers_dst)
    for k in (near, far):
        res.resolve(k, k.dst)
    assert [q["dst"] for q in ipr.route_queries[asked:]] == ["198.19.99.1"]


def address(addr: str, index: int, kind: int = 20) -> Msg:  # RTM_NEWADDR
    return Msg({"IFA_ADDRESS": addr, "IFA_LOCAL": addr}, header={"type": kind}, family=V4,
               index=index)


def test_an_address_renewed_asks_nothing_a_new_one_its_own_flows() -> None:
    w, res = watcher()
    out = Changes()
    w.on_message(address("198.19.10.1", 5), out)
    assert not out.reresolve and not res.forgot
    w.on_message(address("198.19.10.1", 6), out)  # moved to another device
    scope = out.reresolve
    assert scope and not scope.everything
    assert scope.matches(flow("198.19.10.1"))  # sent to it: local now, or no longer
    assert scope.matches(flow("8.8.8.8", nat_src="198.19.10.1"))  # NATed to it
    assert not scope.matches(flow("8.8.8.8", nat_src="198.19.20.1"))
    out = Changes()
    w.on_message(address("198.19.10.1", 6), out)  # the same again: known now
    assert not out.reresolve
    w.on_message(address("198.19.10.1", 6, kind=21), out)  # RTM_DELADDR
    assert out.reresolve.matches(flow("198.19.10.1"))


def test_an_address_under_a_macvlan_resolves_everything() -> None:
    # A bare frame on a device with one macvlan and no address of its own
    # is the macvlan's: an address there changes the walk up.
    w, _res = watcher(links=[Link("macvlan", 7)])
    out = Changes()
    w.on_message(address("198.19.30.1", 7), out)
    assert out.reresolve.everything


def test_lost_events_resolve_everything_again_with_nothing_cached() -> None:
    w, res = watcher(Sock(OSError(105, "No buffer space available")))
    out = w.read()
    assert out.reresolve.everything
    assert res.forgot == [{"links": True, "routes": True, "neigh": True}, {"qdiscs": True}]


# -- a rewritten verdict's TC flag -----------------------------------------------------------
class FlowMap:
    def __init__(self, k: bytes, v: bytes) -> None:
        self.entries = {k: v}

    def lookup(self, k: bytes) -> bytes | None:
        return self.entries.get(k)

    def update(self, k: bytes, v: bytes, flags: int = 0) -> None:
        self.entries[k] = v


@pytest.mark.parametrize("veth", [False, True])
def test_a_flow_rerouted_onto_a_veth_is_left_to_tc(veth: bool) -> None:
    """Re-resolved onto a lowest device XDP must not redirect into (under
    hook auto a veth: Decider.tc_only), the rewritten verdict carries
    OFL_V_TC, as a new flow's would; onto another device it does not."""
    key = FlowKey(ifindex=7, family=V4, proto=17, src=ipaddress.ip_address("198.18.1.2"),
                  dst=ipaddress.ip_address("198.19.99.1"), sport=5000, dport=53)
    old = Verdict(oif=9, l2=L2Header(dmac=bytes(range(6)), smac=bytes(range(6, 12))),
                  mtu=1500, key=key)
    k = key.pack()
    flows = FlowMap(k, old.pack())
    dp: Any = SimpleNamespace(flows=flows, add_tx_port=lambda i: None)
    new = Egress(oif=11, l2=L2Header(dmac=bytes(range(20, 26)), smac=bytes(range(6, 12))),
                 mtu=1500, l3_oif=11, nexthop=ipaddress.ip_address("198.18.1.2"))
    rec = Records()
    r = Rerouter(dp, rec, lambda *_: new, lambda *_: None, lambda iif, oif: veth and oif == 11)
    assert r.judge(k, flows.entries[k]) is False  # rewritten
    written = flows.entries[k]
    assert Verdict.unpack(key, written).oif == 11
    assert bool(written[rec.v_flags] & rec.flag_tc) is veth


@pytest.mark.parametrize("shaped", [False, True])
def test_a_shaper_that_came_moves_an_offloaded_flow_to_tc(shaped: bool) -> None:
    """The same way out, but a qdisc event says the lowest device now has a
    shaper (SQM started: Decider.tc_only): the entry is rewritten with
    OFL_V_TC so that TC, through the device's qdisc, forwards it; once TC's,
    it is left alone. Without a shaper the entry is not touched."""
    key = FlowKey(ifindex=7, family=V4, proto=17, src=ipaddress.ip_address("198.18.1.2"),
                  dst=ipaddress.ip_address("198.19.99.1"), sport=5001, dport=53)
    l2 = L2Header(dmac=bytes(range(6)), smac=bytes(range(6, 12)))
    old = Verdict(oif=9, l2=l2, mtu=1500, key=key)
    k = key.pack()
    flows = FlowMap(k, old.pack())
    dp: Any = SimpleNamespace(flows=flows, add_tx_port=lambda i: None)
    same = Egress(oif=9, l2=l2, mtu=1500, l3_oif=9, nexthop=ipaddress.ip_address("198.18.1.2"))
    rec = Records()
    asked: list[tuple[int, int]] = []

    def tc_only(iif: int, oif: int) -> bool:
        asked.append((iif, oif))
        return shaped

    r = Rerouter(dp, rec, lambda *_: same, lambda *_: None, tc_only)
    assert r.judge(k, flows.entries[k]) is (not shaped)
    assert asked[0] == (7, 9)
    assert bool(flows.entries[k][rec.v_flags] & rec.flag_tc) is shaped
    assert r.judge(k, flows.entries[k]) is True  # TC's already, or never needed
