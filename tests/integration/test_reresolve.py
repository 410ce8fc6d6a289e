"""Route and rule changes re-resolve offloaded flows instead of handing them
all back (issue 10, part 1). Real kernel, no fakes.

    lan1 (198.18.1.2) -- br-lan [router]  wan1 198.19.10.1 ---- i1 --+
                                          wan2 198.19.20.1 ---- i2 --+-- internet
                                                                         198.19.99.1, 198.19.98.1

Routed without NAT (the internet sends everything back through wan1), so the
kernel itself forwards a connection out of whichever uplink the routes and
rules name for its next packet. The main table's default route is WAN1,
table 102's is WAN2. Each test watches one offloaded TCP connection by its
source port: its map entry (state, output device, packet counter, which
starts again from zero if the entry is ever replaced) and the agent's
``torn_down`` and ``rerouted`` counters; and the uplinks' far ends.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from offloader.lab import Topology, _transfer, warm_neighbours
from tests.conftest import need_root
from tests.integration.links import two_uplinks
from tests.poll import poll

pytestmark = pytest.mark.root

HOST = "198.18.1.2"
SERVER, SERVER2 = "198.19.99.1", "198.19.98.1"
NETWORK = "route or link change"  # Teardown.NETWORK
PORT = 9100

ROUTER_NFT = """
table inet lab {
    chain forward {
        type filter hook forward priority 0; policy accept;
        ct state established,related accept
    }
}
"""


def _build(topo: Topology) -> None:
    r, internet = topo.router, topo.wan
    two_uplinks(topo, [(topo.lan1, "lan1p")], ROUTER_NFT)
    internet.sh(f"ip addr add {SERVER}/32 dev lo && ip addr add {SERVER2}/32 dev lo"
                " && ip route add 198.18.1.0/24 via 198.19.10.1")
    internet.sh("sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0"
                " net.ipv4.conf.i1.rp_filter=0 net.ipv4.conf.i2.rp_filter=0")
    topo.lan1.sh(f"ip addr add {HOST}/24 dev eth0 && ip route add default via 198.18.1.1")
    warm_neighbours({topo.lan1: ("198.18.1.1",), r: (HOST, "198.19.10.2", "198.19.20.2")})


@pytest.fixture(params=["xdp", "tc"], scope="module")
def uplinks(request: pytest.FixtureRequest, bpf_object: Any) -> Iterator[Topology]:
    need_root()
    topo = Topology(tag=secrets.token_hex(2))
    topo.hosts = [topo.router, topo.lan1, topo.wan]
    topo.wan_if = "wan1"  # start_agent names br-lan and this; wan2 comes as an extra
    try:
        _build(topo)
        topo.start_agent(hook=request.param, extra=["-i", "wan2"])
        yield topo
    finally:
        topo.down()


class Watched:
    """One TCP transfer from the LAN host, running in a thread."""

    def __init__(self, topo: Topology, target: str, port: int, sport: int,
                 size: int = 10_000_000, rate: int = 1_000_000) -> None:
        self.topo, self.sport = topo, sport
        self.result: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._go, args=(target, port, size, rate),
                                       daemon=True)
        self.thread.start()

    def _go(self, target: str, port: int, size: int, rate: int) -> None:
        try:
            self.result.update(_transfer(self.topo.lan1, self.topo.wan, target, port, port, "tcp",
                                         4, size, 40.0, rate, self.sport))
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.result["error"] = repr(exc)

    def flow(self, status: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Its LAN-to-internet direction's map entry, if offloaded."""
        status = status or self.topo.status(check=False) or {"flows": []}
        for f in status["flows"]:
            if (f["proto"], f["src"], f["sport"], f["state"]) == ("tcp", HOST, self.sport,
                                                                 "offloaded"):
                return f
        return None

    def join(self) -> dict[str, Any]:
        self.thread.join(timeout=60)
        return self.result


def _agent(topo: Topology) -> dict[str, Any]:
    status = topo.status(check=False)
    assert status is not None, topo.read_agent_log()[-2000:]
    agent: dict[str, Any] = status["agent"]
    return agent


def _torn(topo: Topology) -> int:
    return int(_agent(topo)["torn_down"].get(NETWORK, 0))


def _passes(topo: Topology) -> int:
    return int(_agent(topo).get("reresolve_passes", 0))


def _none_offloaded(topo: Topology) -> bool:
    """No map entry offloaded: an earlier test's finished transfer is gone
    (its FIN flows leave at the agent's next sweep)."""
    status = topo.status(check=False)
    return status is not None and not any(f["state"] == "offloaded" for f in status["flows"])


def _moving(w: Watched, dev: str, after: int) -> dict[str, Any] | None:
    """The flow offloaded out of ``dev`` with more than ``after`` packets."""
    f = w.flow()
    return f if f and f["out_dev"] == dev and f["packets"] > after else None


def test_unrelated_rule_route_and_address_changes_leave_the_entry_alone(
        uplinks: Topology) -> None:
    topo, r = uplinks, uplinks.router
    w = Watched(topo, SERVER, PORT, 47100)
    try:
        first = poll(lambda: _moving(w, "wan1", 50), timeout=15)
        assert first, topo.read_agent_log()[-2000:]
        torn, passes = _torn(topo), _passes(topo)
        r.sh("ip rule add priority 300 from 198.18.77.0/24 lookup 102")
        r.sh("ip rule del priority 300 from 198.18.77.0/24 lookup 102")
        r.sh("ip route add 198.18.200.0/24 via 198.19.20.2 dev wan2")
        r.sh("ip addr add 198.19.30.1/24 dev wan2")
        # The agent has read them (a pass re-resolved what they could
        # re-route; an agent that hands flows back counts that instead), and
        # the flow kept its entry: never handed back, its counter still
        # growing from where it was.
        assert poll(lambda: _passes(topo) > passes or _torn(topo) > torn, timeout=10), \
            topo.read_agent_log()[-2000:]
        later = poll(lambda: _moving(w, "wan1", first["packets"] + 50), timeout=10)
        assert later, (first, w.flow())
        assert _torn(topo) == torn, _agent(topo)["torn_down"]
        result = w.join()
        assert result.get("intact"), result
    finally:
        r.sh("ip route del 198.18.200.0/24", check=False)
        r.sh("ip addr del 198.19.30.1/24 dev wan2", check=False)
        w.join()


def test_a_rule_moves_the_offloaded_flow_to_another_uplink_and_back(uplinks: Topology) -> None:
    topo, r, internet = uplinks, uplinks.router, uplinks.wan
    rule = f"priority 300 from {HOST} to {SERVER} lookup 102"
    w = Watched(topo, SERVER, PORT + 1, 47101, size=12_000_000)
    try:
        first = poll(lambda: _moving(w, "wan1", 50), timeout=15)
        assert first, topo.read_agent_log()[-2000:]
        agent = _agent(topo)
        torn, rerouted = agent["torn_down"].get(NETWORK, 0), agent.get("rerouted", 0)
        i2 = internet.link_stat("i2", "rx_bytes")
        r.sh(f"ip rule add {rule}")
        moved = poll(lambda: _moving(w, "wan2", first["packets"]), timeout=10)
        assert moved, (w.flow(), topo.read_agent_log()[-2000:])
        # Out of WAN2 now: its far end receives the transfer (1 MB/s).
        assert poll(lambda: internet.link_stat("i2", "rx_bytes") - i2 > 200_000, timeout=10)
        i1 = internet.link_stat("i1", "rx_bytes")
        r.sh(f"ip rule del {rule}")
        back = poll(lambda: _moving(w, "wan1", moved["packets"]), timeout=10)
        assert back, (w.flow(), topo.read_agent_log()[-2000:])
        assert poll(lambda: internet.link_stat("i1", "rx_bytes") - i1 > 200_000, timeout=10)
        agent = _agent(topo)
        # Rewritten in place both times, never handed back.
        assert agent["torn_down"].get(NETWORK, 0) == torn, agent["torn_down"]
        assert agent.get("rerouted", 0) >= rerouted + 2, agent
        result = w.join()
        assert result.get("intact"), result
    finally:
        r.sh(f"ip rule del {rule}", check=False)
        w.join()


def test_a_route_removed_hands_back_only_the_flow_it_made_unreachable(uplinks: Topology) -> None:
    topo, r = uplinks, uplinks.router
    # The previous test's connection to SERVER has ended; until the sweep
    # removes its entries, a re-resolve would hand them back as well.
    assert poll(lambda: _none_offloaded(topo), timeout=10), topo.status(check=False)
    r.sh("ip route add unreachable 198.19.99.0/24 && ip route add 198.19.99.1/32 via 198.19.10.2")
    lost = Watched(topo, SERVER, PORT + 2, 47102, size=4_000_000)
    kept = Watched(topo, SERVER2, PORT + 3, 47103)
    try:
        assert poll(lambda: _moving(lost, "wan1", 50) and _moving(kept, "wan1", 50), timeout=15), \
            topo.read_agent_log()[-2000:]
        before = kept.flow()
        assert before
        torn = _torn(topo)
        r.sh("ip route del 198.19.99.1/32")
        # SERVER's flow is handed back (the kernel answers it unreachable);
        # SERVER2's keeps its entry.
        assert poll(lambda: _torn(topo) > torn, timeout=10)
        status = topo.status()
        assert lost.flow(status) is None, lost.flow(status)
        assert _torn(topo) == torn + 1, (status["flows"], topo.read_agent_log()[-3000:])
        later = poll(lambda: _moving(kept, "wan1", before["packets"] + 50), timeout=10)
        assert later, (before, kept.flow())
        assert kept.join().get("intact"), kept.result
    finally:
        r.sh("ip route del unreachable 198.19.99.0/24", check=False)
        r.sh("ip route del 198.19.99.1/32", check=False)
        lost.join()
        kept.join()
