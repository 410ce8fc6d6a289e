"""The decider's per-flow shortcuts: the setup latency from the ring
record's stamp (no pending-map lookup per flow), the key packed once, and
each transmit port written to the devmap once. Fakes stand for the maps,
the resolver and conntrack (no BPF object or netlink is needed here)."""

from __future__ import annotations

import ipaddress
import socket
import time
from types import SimpleNamespace
from typing import Any

import pytest
from pyroute2.netlink.nfnetlink.nfctsocket import IPS_ASSURED, IPS_CONFIRMED

from offloader import nftwatch, policy
from offloader.conntrack import CtEntry, Tuple5
from offloader.datapath import Datapath, FlowKey, L2Header
from offloader.decider import FIRST_SEEN_KEPT, Decider
from offloader.decision import Decision
from offloader.errors import ResolveError
from offloader.flowstate import FlowState
from offloader.flowtable import FlowTable
from offloader.records import Records
from offloader.routing import Egress, NotYet, Queueing
from offloader.status import Counters

LAN, WAN = ipaddress.IPv4Address("198.18.1.2"), ipaddress.IPv4Address("198.19.1.2")


class FakeMap:
    def __init__(self) -> None:
        self.updates: list[tuple[bytes, bytes]] = []

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        self.updates.append((key, value))

    def delete(self, key: bytes) -> bool:
        return True


class FakeDatapath:
    """Datapath's own offload and add_tx_port, over fake maps."""

    def __init__(self) -> None:
        self.flows, self.pending, self.tx_ports = FakeMap(), FakeMap(), FakeMap()
        self.pending_lookups = 0
        self.tx_known: set[int] = set()
        self.keys: list[bytes] = []
        self.passed: list[FlowKey] = []
        self._decided: list[bytes] = []

    def pending_first_seen(self, key: FlowKey) -> int:
        self.pending_lookups += 1
        return time.monotonic_ns() - 7_000_000  # 7 ms ago

    def offload_packed(self, raw: bytes, oif: int, value: bytes, *,
                       replace: bool = True) -> bool:
        self.keys.append(raw)
        return Datapath.offload_packed(self, raw, oif, value,  # type: ignore[arg-type]
                                       replace=replace)

    def mark_pass(self, key: FlowKey) -> None:
        self.passed.append(key)

    def add_tx_port(self, ifindex: int) -> None:
        Datapath.add_tx_port(self, ifindex)  # type: ignore[arg-type]

    def forget_tx_ports(self) -> None:
        Datapath.forget_tx_ports(self)  # type: ignore[arg-type]


class FakeResolver:
    def __init__(self) -> None:
        self.resolved = 0
        self.by_port = False
        self.not_yet = False
        self.walked: list[int] = []
        self.owners_read = 0
        self.rules_read = 0
        self.kinds: dict[int, str] = {}  # IFLA_INFO_KIND by ifindex ("" a plain device)
        self.queue = Queueing({}, frozenset())  # qdiscs: no shaper, no ingress qdisc
        self.shaped: tuple[int, str] | None = None  # shaped_on_the_way's answer
        self.upper_oif = 8  # the egress a TC path (full=False) ends at
        self.fulls: list[bool] = []
        self.ruleset = policy.Ruleset(reader=lambda: policy.UNKNOWN, generation=lambda: 0)

    def routes_by_port(self) -> bool:
        self.rules_read += 1
        return self.by_port

    def ingress(self, key: FlowKey) -> object:
        self.walked.append(key.ifindex)
        if key.ifindex == 99:
            raise ResolveError("no device with ifindex 99")
        return object()

    def resolve(self, key: FlowKey, dst: Any, *, full: bool, mark: int) -> Egress:
        self.resolved += 1
        self.fulls.append(full)
        if self.not_yet:
            raise NotYet("no neighbour entry yet")
        return Egress(oif=4 if full else self.upper_oif, l2=L2Header(b"\x02" * 6, b"\x04" * 6),
                      mtu=1500, l3_oif=8, nexthop=WAN)

    def queueing(self) -> Queueing:
        return self.queue

    def shaped_on_the_way(self, path: Egress) -> tuple[int, str] | None:
        return self.shaped

    def address_owner(self, addr: Any) -> int | None:
        self.owners_read += 1
        return None

    def cached_link(self, index: int) -> Any:
        return SimpleNamespace(kind=self.kinds.get(index, ""), name=f"if{index}")


def decider(hook_of: Any = lambda i: "xdp") -> tuple[Decider, FakeDatapath]:
    dp = FakeDatapath()
    queued: list[tuple[bytes, bool, int, bool]] = []  # flows offloaded, for their long timeout
    parts: Any = SimpleNamespace(dp=dp, resolver=FakeResolver(),
                                 ct=SimpleNamespace(offloaded=lambda *a: queued.append(a),
                                                    queued=queued),
                                 net=SimpleNamespace(used=lambda *a: None),
                                 nft=SimpleNamespace(scan=lambda: nftwatch.SCAN_FAILED))
    rec = Records()
    state = FlowState(max_waiting=1024, ident=rec.wire)
    counters = Counters()
    table = FlowTable(dp, counters, rec)  # type: ignore[arg-type]
    return Decider(settings_udp(), parts, state, table, counters, hook_of), dp


def settings_udp(hook: str = "xdp") -> Any:  # only the fields the UDP gate and tc_only read
    return SimpleNamespace(offload_udp="yes", hook=hook)


def udp(sport: int) -> tuple[bytes, CtEntry]:
    key = FlowKey(ifindex=3, family=socket.AF_INET, proto=socket.IPPROTO_UDP, src=LAN, dst=WAN,
                  sport=sport, dport=7000)
    orig = Tuple5(socket.IPPROTO_UDP, LAN, WAN, sport, 7000)
    reply = Tuple5(socket.IPPROTO_UDP, WAN, LAN, 7000, sport)
    return key.pack(), CtEntry(orig, reply, IPS_CONFIRMED | IPS_ASSURED, -1, 0, False, 30)


def test_latency_comes_from_the_ring_stamp_without_a_map_lookup() -> None:
    d, dp = decider()
    raw, entry = udp(10000)
    d.noted(raw, time.monotonic_ns() - 3_000_000)  # first record stamped 3 ms ago
    assert d.decide(raw, (entry, False)) is Decision.OFFLOAD
    assert dp.pending_lookups == 0
    # young: its conntrack entry keeps the kernel's timeout, nothing queued for the next tick
    assert dp.flows.updates[-1][1][d.rec.v_flags] & d.rec.flag_young
    assert d.ct.queued == []
    got = d.latencies.percentiles()
    assert got["n"] == 1 and 3.0 <= float(got["max"]) < 6.0
    assert raw not in d.first_seen  # forgotten once decided


def test_a_key_the_ring_did_not_report_is_looked_up_in_the_pending_map() -> None:
    d, dp = decider()
    raw, entry = udp(10001)
    assert d.decide(raw, (entry, False)) is Decision.OFFLOAD
    assert dp.pending_lookups == 1
    assert float(d.latencies.percentiles()["max"]) >= 7.0


def test_the_transmit_port_is_written_once_for_many_flows() -> None:
    d, dp = decider()
    for sport in range(10100, 10110):
        raw, entry = udp(sport)
        assert d.decide(raw, (entry, False)) is Decision.OFFLOAD
    assert len(dp.flows.updates) == 10
    assert dp.tx_ports.updates == [((4).to_bytes(4, "little"), (4).to_bytes(4, "little"))]
    dp.forget_tx_ports()  # a link change: written again with the next flow
    raw, entry = udp(10200)
    assert d.decide(raw, (entry, False)) is Decision.OFFLOAD
    assert len(dp.tx_ports.updates) == 2


def test_stamps_of_undecided_keys_are_bounded() -> None:
    d, _ = decider()
    for i in range(FIRST_SEEN_KEPT + 10):
        d.noted(i.to_bytes(52, "little"), i)
    assert len(d.first_seen) == FIRST_SEEN_KEPT
    assert (0).to_bytes(52, "little") not in d.first_seen  # the oldest went


def test_flows_of_one_host_pair_share_a_resolved_path_until_forgotten() -> None:
    d, dp = decider()
    resolver: FakeResolver = d.resolver  # type: ignore[assignment]
    for sport in range(10300, 10320):
        raw, entry = udp(sport)
        assert d.decide(raw, (entry, False)) is Decision.OFFLOAD
    assert resolver.resolved == 1 and len(dp.flows.updates) == 20
    d.forget_paths()  # a network change
    raw, entry = udp(10400)
    assert d.decide(raw, (entry, False)) is Decision.OFFLOAD
    assert resolver.resolved == 2


def test_ports_are_part_of_the_path_when_a_policy_rule_matches_on_them() -> None:
    d, _ = decider()
    resolver: FakeResolver = d.resolver  # type: ignore[assignment]
    resolver.by_port = True
    for sport in range(10500, 10505):
        raw, entry = udp(sport)
        assert d.decide(raw, (entry, False)) is Decision.OFFLOAD
    assert resolver.resolved == 5


def test_not_yet_is_asked_again() -> None:
    d, dp = decider()
    resolver: FakeResolver = d.resolver  # type: ignore[assignment]
    resolver.not_yet = True
    raw, entry = udp(10600)
    assert d.decide(raw, (entry, False)) is Decision.WAIT
    resolver.not_yet = False
    assert d.decide(raw, (entry, False)) is Decision.OFFLOAD
    assert resolver.resolved == 2 and len(dp.flows.updates) == 1


def test_decide_with_tells_the_direction_from_the_key_bytes() -> None:
    d, dp = decider()
    raw, entry = udp(10700)
    assert d.decide_with(raw, entry) is Decision.OFFLOAD  # the original direction
    flags = dp.flows.updates[-1][1][d.rec.v_flags]
    assert not flags & d.rec.flag_reply
    reply_key = FlowKey(ifindex=4, family=socket.AF_INET, proto=socket.IPPROTO_UDP, src=WAN,
                        dst=LAN, sport=7000, dport=10700)
    assert d.decide_with(reply_key.pack(), entry) is Decision.OFFLOAD
    assert dp.flows.updates[-1][1][d.rec.v_flags] & d.rec.flag_reply


def test_warm_walks_up_from_each_attached_device_and_reads_the_addresses() -> None:
    d, _ = decider()
    resolver: FakeResolver = d.resolver  # type: ignore[assignment]
    d.warm([3, 99, 4])  # 99 is gone: logged, the others still warmed
    assert resolver.walked == [3, 99, 4] and resolver.owners_read == resolver.rules_read == 1


@pytest.mark.parametrize(("hook", "kind", "by_tc"), [
    ("auto", "veth", True),  # a container's port: XDP must not redirect into it
    ("auto", "", False),  # a NIC: XDP forwards
    ("hybrid", "veth", False),  # asked for: XDP into the veth (its peer must have GRO on)
    ("xdp", "veth", False),
])
def test_under_auto_a_flow_leaving_by_a_veth_is_forwarded_by_tc(hook: str, kind: str,
                                                                by_tc: bool) -> None:
    """A frame XDP redirects into a veth is dropped unless the peer has
    GRO on or an XDP program (a fresh veth has neither): under hook auto
    the verdict of a flow whose lowest egress is a veth carries OFL_V_TC,
    so XDP passes its packets and TC (or the kernel) forwards them. The
    resolver is a fake: the real case (a NIC with native XDP in hybrid, a
    container's veth) cannot be built here, since veth is the only device
    with native XDP and auto gives it TC."""
    d, dp = decider()
    d.settings = settings_udp(hook)
    resolver: FakeResolver = d.resolver  # type: ignore[assignment]
    resolver.kinds[4] = kind  # the lowest egress FakeResolver.resolve returns
    raw, entry = udp(10700)
    assert d.decide(raw, (entry, False)) is Decision.OFFLOAD
    flags = dp.flows.updates[-1][1][d.rec.v_flags]
    assert bool(flags & d.rec.flag_tc) is by_tc
    assert flags & d.rec.flag_young  # the other flags kept
