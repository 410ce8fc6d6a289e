"""A LAN host that moves between bridge ports (Wi-Fi roaming between two
radios of one bridge), and a WAN next hop whose MAC changes, while an
offloaded TCP transfer runs (issue 10, part 3). Real kernel, no fakes.

The lab's lan1 gets a second link, eth1, behind a second bridge port
(lan1b). Roaming, as a station does it: the host leaves the old radio (an
nft rule at its old interface's ingress drops and counts what still arrives
there, as an access point loses frames for a departed station), takes its MAC
and address
to eth1 and announces itself there (a gratuitous ARP, as hostapd's layer-2
update frame does on association); the bridge moves its FDB entry. No link of
the router changes state: only the FDB (or, for the next hop, the neighbour
table) tells the agent.

Facts asserted for this one connection: offloaded into the old port before;
within one sweep after the kernel knows the move, nothing of it is offloaded
into the old port or to the old MAC any more and it is offloaded again
through the new one; from then on the old port (old MAC) receives none of its
packets; the transfer arrives intact.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from offloader.lab import LAN1_4, ROUTER_LAN4, WAN_4, Host, Topology, lab_network
from tests.conftest import need_root
from tests.integration.transfer import background_transfer
from tests.poll import poll

pytestmark = pytest.mark.root

SWEEP_S = 1.0  # the agent's sweep interval, given explicitly below
# Bound for "within one sweep": the sweep itself, plus a status round trip
# (a CLI process start) to observe it.
ONE_SWEEP = SWEEP_S + 2.0
SIZE = 8_000_000
RATE = 2_000_000  # bytes/s: about 4 s, so the move happens in the middle

GARP = r"""
import socket, sys
dev, ip = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((dev, 0))
mac, addr = s.getsockname()[4], socket.inet_aton(ip)
arp = bytes.fromhex("0001080006040001") + mac + addr + bytes(6) + addr
s.send((b"\xff" * 6 + mac + b"\x08\x06" + arp).ljust(60, b"\0"))
"""


def _garp(host: Host, dev: str, addr: str) -> None:
    """A gratuitous ARP request from ``dev``: whoever knows ``addr`` learns
    the sender's MAC; a bridge learns the port it came in on."""
    host.sh(f"{sys.executable} -c '{GARP}' {dev} {addr}")


def _mac(host: Host, dev: str) -> str:
    return host.sh(f"cat /sys/class/net/{dev}/address").stdout.strip()


def _drop_and_count(host: Host, dev: str, match: str) -> None:
    """Drop what arrives at ``dev`` matching ``match`` (at its ingress hook, where
    redirected frames arrive too), counted in the counter read by ``_lost``."""
    host.sh("nft -f -", input=f"""
table netdev gone {{
    counter lost {{ }}
    chain ingress {{
        type filter hook ingress device "{dev}" priority 0; policy accept;
        {match} counter name lost drop
    }}
}}""")


def _lost(host: Host) -> int:
    out = host.sh("nft -j list counter netdev gone lost").stdout
    return next(int(i["counter"]["packets"]) for i in json.loads(out)["nftables"]
                if "counter" in i)


def _network(topo: Topology) -> str:
    """What the kernels saw, for a failure message: the router's conntrack
    entries and every namespace's neighbours (the agent's view is in
    ``status``; this is the kernel's, when a connection never establishes)."""
    parts = [topo.router.sh("conntrack -L 2>&1", check=False).stdout]
    parts += [f"{h.name}: " + h.sh("ip neigh show", check=False).stdout
              for h in (topo.router, topo.lan1, topo.wan)]
    return "\n".join(parts)


def _flows(topo: Topology, match: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    return [f for f in (topo.status() or {"flows": []})["flows"]
            if f["proto"] == "tcp" and f["state"] == "offloaded" and match(f)]


@pytest.fixture(params=["xdp", "tc"])
def roaming_lab(request: pytest.FixtureRequest, bpf_object: Any) -> Iterator[Topology]:
    need_root()
    with lab_network() as topo:
        # lan1's second radio: eth1 behind bridge port lan1b. Silent until the
        # host roams to it: no ARP answers, no IPv6 autoconfiguration.
        topo._veth(topo.lan1, "eth1", "lan1b", master="br-lan")
        topo.lan1.sh("sysctl -qw net.ipv6.conf.eth1.disable_ipv6=1 && ip link set eth1 arp off"
                     " && ethtool -K eth1 tx off gro on >/dev/null")
        # Packet counts mean packets: no TSO/GSO on the senders.
        for host, dev in ((topo.lan1, "eth0"), (topo.lan1, "eth1"), (topo.wan, "eth0")):
            host.sh(f"ethtool -K {dev} tso off gso off >/dev/null")
        topo.start_agent(hook=request.param, extra=["-o", f"sweep_interval={SWEEP_S}"])
        attached = {i["name"] for i in (topo.status() or {"interfaces": []})["interfaces"]}
        assert "lan1b" in attached, attached
        yield topo


def test_host_roams_to_another_bridge_port(roaming_lab: Topology) -> None:
    """A download through the port forward (WAN -> lan1:80) while lan1 moves
    from bridge port lan1p to lan1b."""
    topo = roaming_lab
    sport = 41020  # the WAN sender's port: the download direction's key
    mac = _mac(topo.lan1, "eth0")

    def towards(port: str) -> Callable[[], list[dict[str, Any]]]:
        return lambda: _flows(topo, lambda f: f["sport"] == sport and f["out_dev"] == port)

    t, out = background_transfer(topo, proto="tcp", family=4, dnat=True, size=SIZE,
                                 rate_pps=RATE, timeout=40, sport=sport)
    try:
        before = poll(lambda: [f for f in towards("lan1p")() if f["packets"] >= 200])
        assert before, (f"download never offloaded into lan1p: {topo.status()}\n"
                        f"{_network(topo)}")
        # The station leaves radio A (silent there from now on; what still
        # arrives is counted and lost) and associates on radio B with the
        # same MAC and address.
        _drop_and_count(topo.lan1, "eth0", f"ip daddr {LAN1_4}")
        topo.lan1.sh(
            f"ip addr del {LAN1_4}/24 dev eth0 && ip link set eth0 arp off"
            f" && sysctl -qw net.ipv6.conf.eth0.disable_ipv6=1"
            f" && ip link set eth1 address {mac} && ip link set eth1 arp on"
            f" && ip addr add {LAN1_4}/24 dev eth1"
            f" && ip route replace default via {ROUTER_LAN4} dev eth1")
        _garp(topo.lan1, "eth1", LAN1_4)
        fdb = poll(lambda: f"{mac} dev lan1b" in topo.router.sh(
            f"bridge fdb show br br-lan | grep -i {mac}", check=False).stdout.lower())
        assert fdb, topo.router.sh("bridge fdb show br br-lan").stdout
        # The kernel knows the move. Within one sweep the agent knows it too:
        # nothing of this download is offloaded into the old port ...
        gone = poll(lambda: not towards("lan1p")(), timeout=ONE_SWEEP)
        lost_before = _lost(topo.lan1)
        assert gone, (f"still offloaded into lan1p after the FDB moved to lan1b: "
                      f"{towards('lan1p')()}")
        # ... and the packets follow the host: offloaded again, through lan1b.
        follow = poll(lambda: towards("lan1b")(), timeout=ONE_SWEEP)
        assert follow, f"not offloaded through lan1b after the move: {topo.status()}"
    finally:
        t.join(timeout=60)
    lost_after = _lost(topo.lan1)
    print(f"roaming: {lost_before} packets reached the old port before the agent moved "
          f"the flow, {lost_after - lost_before} after")
    assert out.get("intact"), out
    # Nothing went into the old port once the move was known.
    assert lost_after == lost_before, (lost_before, lost_after)


def test_next_hop_mac_changes(roaming_lab: Topology) -> None:
    """An upload (lan1 -> WAN, masqueraded) while the WAN next hop takes a
    new MAC (a replaced upstream router, a VRRP failover) and announces it."""
    topo = roaming_lab
    sport = 41021
    old_mac = _mac(topo.wan, "eth0")
    new_mac = "02:00:5e:10:00:21"

    def upload() -> list[dict[str, Any]]:
        return _flows(topo, lambda f: f["sport"] == sport and f["out_dev"] == "wan0")

    t, out = background_transfer(topo, proto="tcp", family=4, size=SIZE, rate_pps=RATE,
                                 timeout=40, sport=sport)
    try:
        before = poll(lambda: [f for f in upload() if f["packets"] >= 1000])
        assert before, (f"upload never offloaded out of wan0: {topo.status()}\n"
                        f"{_network(topo)}")
        most = max(f["packets"] for f in before)
        # Frames still addressed to the old MAC are counted (and lost: the
        # interface no longer has that address).
        _drop_and_count(topo.wan, "eth0", f"ether daddr {old_mac} ip protocol tcp")
        topo.wan.sh(f"ip link set eth0 address {new_mac}")
        _garp(topo.wan, "eth0", WAN_4)
        known = poll(lambda: new_mac in topo.router.sh(f"ip neigh show {WAN_4} dev wan0").stdout)
        assert known, topo.router.sh("ip neigh show").stdout
        # The router knows the new MAC. Within one sweep this connection's
        # offloaded entry is a new one (its packet count started again) ...
        fresh = poll(lambda: [f for f in upload() if f["packets"] < most], timeout=ONE_SWEEP)
        lost_before = _lost(topo.wan)
        assert fresh, f"the entry to the old MAC was never replaced: {upload()}"
    finally:
        t.join(timeout=60)
    lost_after = _lost(topo.wan)
    print(f"next hop MAC change: {lost_before} packets went to the old MAC before the agent "
          f"replaced the entry, {lost_after - lost_before} after")
    assert out.get("intact"), out
    # ... and nothing was sent to the old MAC after that.
    assert lost_after == lost_before, (lost_before, lost_after)
