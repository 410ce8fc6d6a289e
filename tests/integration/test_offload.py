"""End to end on the real kernel: namespaces, veth, a bridge, nftables NAT,
conntrack, and the agent offloading real traffic (no fakes)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from offloader.lab import LAN1_4, LAN1_6, ROUTER_WAN4, WAN_4, WAN_6, Topology, lab_network
from tests.conftest import need_root
from tests.integration.transfer import background_transfer
from tests.poll import poll

pytestmark = pytest.mark.root

SIZE = 6_000_000
# bytes/s: about 1 s for SIZE, so that offload matters and the status polls
# (0.1-0.5 s each on a loaded machine) see the flow before its FIN hands it back
TCP_RATE = 6_000_000
MACVLAN_RATE = 3_000_000  # bytes/s


def _senders_plain(topo: Topology) -> None:
    # Packet counts should mean packets: no TSO/GSO on the sending hosts.
    for host in (topo.lan1, topo.lan2, topo.wan):
        host.sh("ethtool -K eth0 tso off gso off >/dev/null")


@pytest.fixture(params=["xdp", "tc"], scope="module")
def lab(request: pytest.FixtureRequest, bpf_object: Any) -> Iterator[Topology]:
    need_root()
    with lab_network() as topo:
        _senders_plain(topo)
        topo.start_agent(hook=request.param)
        yield topo


def _flow(status: dict[str, Any], *, proto: str, dport: int | None = None,
          sport: int | None = None, src: str | None = None) -> list[dict[str, Any]]:
    return [f for f in status["flows"] if f["proto"] == proto
            and (dport is None or f["dport"] == dport)
            and (sport is None or f["sport"] == sport)
            and (src is None or f["src"] == src)]


def _offloaded(topo: Topology, proto: str, sport: int) -> list[dict[str, Any]]:
    """The offloaded flows of ``proto`` from source port ``sport`` right now."""
    return [f for f in _flow(topo.status() or {"flows": []}, proto=proto, sport=sport)
            if f["state"] == "offloaded"]


CASES = [
    ("tcp", 4, False), ("udp", 4, False), ("tcp", 6, False), ("udp", 6, False),
    ("tcp", 4, True), ("udp", 4, True), ("tcp", 6, True),
]


@pytest.mark.parametrize("proto,family,dnat", CASES,
                         ids=[f"{p}{f}{'-dnat' if d else '-masq'}" for p, f, d in CASES])
def test_transfer_is_offloaded_and_intact(lab: Topology, proto: str, family: int,
                                          dnat: bool) -> None:
    est_before = lab.nft_counter("fwd_established")[0]
    rate = TCP_RATE if proto == "tcp" else 4000
    size = SIZE if proto == "tcp" else 1_500_000
    if dnat:  # data towards lan1 through the port forward
        dst = {4: "198.19.2.1", 6: "2001:db8:2::1"}[family]

        def mine(f: dict[str, Any]) -> bool:
            return f["proto"] == proto and f["dport"] == 8080 and f["dst"] == dst
    else:  # data from lan1 out through the masquerade
        src = LAN1_4 if family == 4 else LAN1_6

        def mine(f: dict[str, Any]) -> bool:
            return f["proto"] == proto and f["dport"] == 9000 and f["src"] == src

    # FIN hands TCP flows back at the end: watch the counters while it runs.
    seen: dict[tuple[Any, ...], int] = {}
    t, result = background_transfer(lab, proto=proto, family=family, dnat=dnat, size=size,
                                    rate_pps=rate)
    deadline = time.monotonic() + 60
    while t.is_alive() and time.monotonic() < deadline:
        for f in (lab.status() or {"flows": []})["flows"]:
            if mine(f) and f["state"] == "offloaded":
                fid = (f["sport"], f["in_dev"])
                seen[fid] = max(seen.get(fid, 0), f["packets"])
        time.sleep(0.05)
    t.join(timeout=30)
    est_after = lab.nft_counter("fwd_established")[0]
    assert result.get("intact"), result
    assert seen, "the flow was never offloaded"
    data_packets = max(seen.values())
    expected = size // (1448 if proto == "tcp" else 1000)
    # The datapath carried the bulk (counted until the last status poll) ...
    assert data_packets > 0.5 * expected, (data_packets, expected)
    # ... and the kernel's established-traffic counter grew by far less.
    assert est_after - est_before < 0.4 * expected, (est_after - est_before, expected)
    # The agent's loop never stalled long enough for the fail-safe to engage.
    assert (lab.status() or {"datapath": {}})["datapath"].get("pass_stale") == 0


def _conntrack(topo: Topology, proto: str, sport: int) -> str:
    """The router's conntrack entries of ``proto`` from source port ``sport``."""
    return topo.router.sh(f"conntrack -L -o id -p {proto} --sport {sport} 2>/dev/null",
                          check=False).stdout


def test_fin_hands_the_flow_back(lab: Topology) -> None:
    sport = 41001
    # Paced so that the connection lives long enough (about 1 s) to be seen offloaded.
    t, out = background_transfer(lab, proto="tcp", family=4, size=3_000_000,
                                 rate_pps=3_000_000, sport=sport)
    try:
        during = poll(lambda: [f for f in _offloaded(lab, "tcp", sport) if f["packets"] > 0])
    finally:
        t.join(timeout=40)
    assert during, f"flow from port {sport} never offloaded: {lab.status()}"
    assert out.get("intact"), out
    # The FINs and the last ACK went through the kernel: conntrack saw this
    # connection close completely (a datapath that forwarded the FINs would
    # leave it ESTABLISHED, one that forwarded the last ACK in LAST_ACK).
    assert poll(lambda: "TIME_WAIT" in _conntrack(lab, "tcp", sport)), (
        _conntrack(lab, "tcp", sport))

    def mine_offloaded() -> list[dict[str, Any]]:
        st = lab.status() or {"flows": []}
        return [f for f in _flow(st, proto="tcp", sport=sport) + _flow(st, proto="tcp",
                                                                       dport=sport)
                if f["state"] == "offloaded"]

    # ... and this flow, both directions, was handed back (within a sweep or two).
    assert poll(lambda: not mine_offloaded(), timeout=5), mine_offloaded()


def test_status_json_contract(lab: Topology) -> None:
    st = lab.status()
    assert st is not None
    assert st["running"] is True
    assert {i["name"] for i in st["interfaces"]} == {"lan1p", "lan2p", "wan0"}
    assert all(i["hook"] in ("xdp", "tc") for i in st["interfaces"])
    for f in st["flows"]:
        assert {"family", "proto", "src", "dst", "sport", "dport", "state", "packets",
                "bytes"} <= set(f)
        assert f["state"] in ("pending", "offloaded", "passed")
    human = lab.cli("status").stdout
    assert "ebpf-offloader running" in human and "wan0" in human


def test_nsenter_status_reaches_the_same_agent(lab: Topology) -> None:
    proc = subprocess.run(["nsenter", f"--net=/run/netns/{lab.router.name}", sys.executable, "-m",
                           "offloader.cli", "status", "--json"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["pid"] == lab.status()["pid"]  # type: ignore[index]


def test_status_without_agent_says_so(bpf_object: Any) -> None:
    need_root()
    with lab_network() as topo:
        proc = topo.cli("status", check=False)
        assert proc.returncode == 1
        assert "no ebpf-offloader agent is running" in proc.stderr
        assert topo.cli("flush", check=False).returncode == 1


def test_conntrack_refresh_keeps_long_transfer_alive(bpf_object: Any) -> None:
    need_root()
    with lab_network() as topo:
        _senders_plain(topo)
        # Short timeouts in the router's own namespace: the transfer outlives
        # them, so only the agent's refresh keeps conntrack (and NAT) alive.
        topo.router.sh("sysctl -qw net.netfilter.nf_conntrack_tcp_timeout_established=4 "
                       "net.netfilter.nf_conntrack_udp_timeout_stream=4 "
                       "net.netfilter.nf_conntrack_udp_timeout=4")
        topo.start_agent(hook="xdp")
        sport = 41009
        # Paced to about 10 s, more than twice the 4 s timeouts: the stimulus.
        t, result = background_transfer(topo, proto="tcp", family=4, size=3_000_000,
                                        rate_pps=300_000, timeout=40, sport=sport)
        try:
            assert poll(lambda: _offloaded(topo, "tcp", sport)), topo.status()
            ids = _conntrack_ids(topo, sport)
        finally:
            t.join(timeout=60)
        assert result.get("intact"), result
        # One conntrack entry for the connection's whole life: had it expired
        # (the kernel sees no packets of an offloaded flow), the kernel would
        # have picked the stream up again as a new entry, or broken it.
        assert len(ids) == 1 and _conntrack_ids(topo, sport) == ids, (
            ids, _conntrack(topo, "tcp", sport))
        st = topo.status()
        assert st and st["agent"]["conntrack_refreshes"] >= 2
        # The refreshes never stalled the agent's loop: the heartbeat stayed fresh.
        assert st["datapath"]["pass_stale"] == 0


def _conntrack_ids(topo: Topology, sport: int) -> set[str]:
    return {w for line in _conntrack(topo, "tcp", sport).splitlines() for w in line.split()
            if w.startswith("id=")}


def test_conntrack_delete_removes_offload(bpf_object: Any) -> None:
    need_root()
    with lab_network() as topo:
        _senders_plain(topo)
        topo.start_agent(hook="xdp")
        t, out = background_transfer(topo, proto="tcp", family=4, size=3_000_000,
                                     rate_pps=500_000, timeout=30, sport=41002)
        try:
            assert poll(lambda: _offloaded(topo, "tcp", 41002))
            topo.router.sh("conntrack -D -p tcp --sport 41002 >/dev/null 2>&1", check=False)
            assert poll(lambda: (topo.status() or {"agent": {"torn_down": {}}})["agent"]
                         ["torn_down"].get("conntrack-destroyed", 0) >= 1, timeout=4)
        finally:
            t.join(timeout=40)
        assert "error" not in out, out


def _counter(host: Any, table: str, name: str) -> int:
    """Packets counted by the named nft counter ``name`` of ``table`` in ``host``."""
    out = host.sh(f"nft -j list counter {table} {name}").stdout
    return next(int(i["counter"]["packets"]) for i in json.loads(out)["nftables"]
                if "counter" in i)


def test_a_new_drop_rule_takes_effect_at_once(bpf_object: Any) -> None:
    need_root()
    sport = 41003
    with lab_network() as topo:
        _senders_plain(topo)
        # What arrives at the WAN host from this flow (masqueraded to the router's address).
        topo.wan.sh("nft -f -", input=f"""
table inet seen {{
    counter rx {{ }}
    chain input {{
        type filter hook input priority 0; policy accept;
        ip saddr {ROUTER_WAN4} udp dport 9000 counter name rx
    }}
}}""")
        topo.router.sh("nft add counter inet lab drop_flow")
        topo.start_agent(hook="xdp")
        # 6,000 datagrams at 1,000 a second: the stream outlasts what follows.
        t, out = background_transfer(topo, proto="udp", family=4, size=6_000_000,
                                     rate_pps=1000, timeout=20, sport=sport)
        try:
            first = poll(lambda: _offloaded(topo, "udp", sport))
            assert first, f"flow from port {sport} never offloaded: {topo.status()}"
            topo.router.sh(f"nft insert rule inet lab forward udp sport {sport} "
                           "counter name drop_flow drop")
            # The ruleset watcher hands the flow back at once (no flush needed):
            # from the change on the new rule judges it, its drop counter moves ...
            assert poll(lambda: _counter(topo.router, "inet lab", "drop_flow") >= 1), \
                topo.status()
            rx_at_drop = _counter(topo.wan, "inet seen", "rx")
            dropped_at = _counter(topo.router, "inet lab", "drop_flow")
            assert poll(lambda: _counter(topo.router, "inet lab", "drop_flow")
                         >= dropped_at + 200)
            # ... fw4's flush after the reload changes nothing any more ...
            topo.cli("flush")
            assert poll(lambda: _counter(topo.router, "inet lab", "drop_flow")
                         >= dropped_at + 300)
            rx_after = _counter(topo.wan, "inet seen", "rx")
            # ... and the kernel never forwarded it again, so it stays with the kernel.
            assert not _offloaded(topo, "udp", sport), topo.status()
        finally:
            t.join(timeout=30)
        # ... and none of its datagrams reached the WAN host while 200 were dropped.
        assert rx_after == rx_at_drop, (rx_at_drop, rx_after)
        assert "error" not in out, out


def test_sigkill_fail_safe_and_restart(bpf_object: Any) -> None:
    need_root()
    with lab_network() as topo:
        _senders_plain(topo)
        topo.start_agent(hook="xdp")
        t, out = background_transfer(topo, proto="tcp", family=4, size=4_000_000,
                                     rate_pps=400_000, timeout=40, sport=41004)
        try:
            assert poll(lambda: _offloaded(topo, "tcp", 41004))
            topo.stop_agent(sig=signal.SIGKILL)
            # The stimulus, not a wait for a condition: the agent stays dead past
            # the heartbeat timeout (3 s), so the datapath passes everything.
            time.sleep(4.0)
            topo.start_agent(hook="xdp")
            assert poll(lambda: _offloaded(topo, "tcp", 41004), timeout=10)
        finally:
            t.join(timeout=60)
        assert out.get("intact"), out


def test_routed_without_nat(bpf_object: Any) -> None:
    need_root()
    with lab_network(nat=False) as topo:
        _senders_plain(topo)
        topo.start_agent(hook="xdp")
        for proto, family in (("tcp", 4), ("udp", 6)):
            rate = TCP_RATE if proto == "tcp" else 4000
            r = topo.transfer(proto=proto, family=family, size=2_000_000, rate_pps=rate)
            assert r["intact"], r
        st = topo.status()
        assert st is not None
        offloaded = [f for f in st["flows"] if f["state"] == "offloaded"]
        assert offloaded and all(not f.get("nat") for f in offloaded), offloaded
        assert {f["dst"] for f in offloaded} & {WAN_4, WAN_6}


def test_restart_adopts_pinned_flows(bpf_object: Any) -> None:
    """Under nsenter --net the agent sees the host's BPF filesystem and pins
    its maps per namespace; a restarted agent adopts the flows it finds."""
    need_root()
    with lab_network() as topo:
        _senders_plain(topo)
        pin = Path(topo.pin_dir())  # removed by topo.down(), also on failure
        try:
            topo.start_agent(hook="xdp", nsenter=True)
            t, out = background_transfer(topo, proto="udp", family=4, size=4_000_000,
                                         rate_pps=1000, timeout=20, sport=41005)
            try:
                assert poll(lambda: _offloaded(topo, "udp", 41005))
                assert (pin / "ofl_flows").exists()
                topo.stop_agent()  # clean stop: detached, maps stay pinned
                topo.start_agent(hook="xdp", nsenter=True)
                assert "adopted 1 flows" in topo.read_agent_log()
                assert _offloaded(topo, "udp", 41005)  # at once: no new decision needed
            finally:
                t.join(timeout=30)
            assert out.get("received", 0) > 0
        finally:
            topo.stop_agent()


def test_sighup_reload_applies_new_exclusions(bpf_object: Any, tmp_path: Path) -> None:
    """SIGHUP re-reads the file: a source newly excluded is handed back to the
    kernel and not offloaded again; flows the change does not touch stay."""
    need_root()
    cfg = tmp_path / "ebpf-offloader"
    base = "config offloader 'main'\n\toption enabled '1'\n"
    cfg.write_text(base)
    with lab_network() as topo:
        _senders_plain(topo)
        topo.start_agent(hook="xdp", extra=["-c", str(cfg)])
        t, out = background_transfer(topo, proto="udp", family=4, size=6_000_000,
                                     rate_pps=1000, timeout=20, sport=41006)
        try:
            assert poll(lambda: _offloaded(topo, "udp", 41006))
            cfg.write_text(base + "\tlist exclude_src '198.18.1.2/32'\n")
            assert topo.agent is not None
            topo.agent.send_signal(signal.SIGHUP)
            assert poll(lambda: "configuration reloaded" in topo.read_agent_log(), timeout=5)
            # Handed back, then decided again: passed, not offloaded.
            assert poll(lambda: [f for f in _flow(topo.status() or {"flows": []}, proto="udp",
                                                   sport=41006) if f["state"] == "passed"])
            assert not _offloaded(topo, "udp", 41006)
        finally:
            t.join(timeout=30)
        assert out.get("intact"), out


@pytest.mark.parametrize("hook", ["xdp", "tc"])
def test_macvlan_wan_and_two_lan_hosts(bpf_object: Any, hook: str) -> None:
    """The WAN addresses on a macvlan over wan0 and both LAN hosts sending at
    once: XDP attaches to wan0 under the macvlan and writes the macvlan's MAC;
    TC attaches to the macvlan itself and redirects into it. Both bridge ports
    get their own flows, each to its own port."""
    need_root()
    with lab_network(wan_macvlan=True) as topo:
        _senders_plain(topo)
        topo.start_agent(hook=hook)
        st = topo.status()
        assert st is not None
        attached = {i["name"] for i in st["interfaces"]}
        assert attached == ({"lan1p", "lan2p", "wan0"} if hook == "xdp"
                            else {"lan1p", "lan2p", "wanm"})
        # About 1 s each: long enough for the status polls to see both
        # hosts' flows on a loaded machine.
        t1, out1 = background_transfer(topo, proto="tcp", family=4, size=3_000_000,
                                       rate_pps=MACVLAN_RATE, sport=41007)
        # lan2 sends too (its own sender process, same receiver logic)
        from offloader.lab import _transfer

        out2: dict[str, Any] = {}

        def lan2() -> None:
            out2.update(_transfer(topo.lan2, topo.wan, WAN_4, 9001, 9001, "tcp", 4,
                                  3_000_000, 30.0, MACVLAN_RATE, 41008))

        t2 = threading.Thread(target=lan2)
        t2.start()
        seen: dict[int, set[str]] = {41007: set(), 41008: set()}
        deadline = time.monotonic() + 30
        while (t1.is_alive() or t2.is_alive()) and time.monotonic() < deadline:
            for f in (topo.status() or {"flows": []})["flows"]:
                if f["state"] != "offloaded" or f["proto"] != "tcp":
                    continue
                for port in seen:
                    if port in (f["sport"], f["dport"]):
                        seen[port].add(f"{f['in_dev']}>{f.get('out_dev')}")
            time.sleep(0.05)
        t1.join(timeout=30)
        t2.join(timeout=30)
        assert out1.get("intact") and out2.get("intact"), (out1, out2)
        wan = "wan0" if hook == "xdp" else "wanm"
        assert f"lan1p>{wan}" in seen[41007] and f"{wan}>lan1p" in seen[41007], seen
        assert f"lan2p>{wan}" in seen[41008] and f"{wan}>lan2p" in seen[41008], seen


_SEND_ONE = ("import socket, sys; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
             ".sendto(b'x', (sys.argv[1], 9))")


def test_macvlan_wan_download_when_the_wan_side_resolved_the_router(bpf_object: Any) -> None:
    """The WAN peer resolves the router's WAN address itself (an ARP request
    from the WAN side) just before a download. Only the macvlan may answer:
    were the lower device to answer too (ARP flux, Linux's default
    arp_ignore 0), the peer would hold wan0's MAC (wan0 answers first, the
    macvlan's broadcast handling is deferred) until the router's next ARP
    probe some seconds later; its frames would enter through wan0, never
    pass the TC hook on wanm, and the download would stay with the kernel.
    The lab's router runs OpenWrt's arp_ignore=1: the peer holds wanm's MAC
    and the download is offloaded."""
    need_root()
    with lab_network(wan_macvlan=True) as topo:
        _senders_plain(topo)
        topo.start_agent(hook="tc")
        wanm_mac = json.loads(topo.router.sh("ip -j link show wanm").stdout)[0]["address"]

        def peer_holds() -> str | None:
            for n in json.loads(topo.wan.sh("ip -j neigh show dev eth0").stdout):
                if n.get("dst") == ROUTER_WAN4 and n.get("lladdr"):
                    return str(n["lladdr"])
            return None

        # The router knows the peer already (so its ICMP answer to the
        # datagram below needs no ARP request of its own, which would make
        # the peer take wanm's MAC); then the peer resolves the router.
        topo.router.sh(f"{sys.executable} -c \"{_SEND_ONE}\" {WAN_4}")
        held = []
        for _ in range(3):
            topo.wan.sh("ip neigh flush dev eth0")
            topo.wan.sh(f"{sys.executable} -c \"{_SEND_ONE}\" {ROUTER_WAN4}")
            held.append(poll(peer_holds, timeout=5))
        # A download at once: the WAN host sends to lan1 through the port forward.
        sport = 41011
        t, out = background_transfer(topo, proto="tcp", family=4, size=3_000_000, dnat=True,
                                     rate_pps=3_000_000, timeout=30, sport=sport)
        most: dict[str, int] = {}
        while t.is_alive():
            for f in _flow(topo.status() or {"flows": []}, proto="tcp"):
                if f["state"] == "offloaded" and sport in (f["sport"], f["dport"]):
                    way = f"{f['in_dev']}>{f.get('out_dev')}"
                    most[way] = max(most.get(way, 0), f["packets"])
            time.sleep(0.05)
        t.join(timeout=30)
        assert held == [wanm_mac] * 3, (held, wanm_mac, most, out)
        assert out.get("intact"), out
        # Both directions offloaded, and the download carried the bulk.
        assert most.get("lan1p>wanm", 0) > 0 and most.get("wanm>lan1p", 0) > 1000, most
