"""Multi-WAN policy routing end to end on the real kernel (no fakes).

    lan1 (198.18.1.2) --+                   wan1 198.19.10.1 ---- i1 --+
                        +-- br-lan [router]                            +-- internet
    lan2 (198.18.1.3) --+                   wan2 198.19.20.1 ---- i2 --+   198.19.99.1

The router masquerades out of both uplinks and pins lan2's connections to
WAN2 the way mwan3 does: prerouting marks the connection (`ct mark set
0x200`) and restores it as the packet mark (`meta mark set ct mark`);
`ip rule fwmark 0x200/0x300 lookup 102` sends marked packets to table 102,
whose default route is WAN2. The internet namespace filters spoofed sources
(rp_filter=1): a packet of lan2's, masqueraded to WAN2's address but sent out
of WAN1, is dropped there. So a lan2 transfer only arrives intact if the
agent routes its offloaded packets with the connection's mark.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from offloader.lab import Host, Topology, _transfer, warm_neighbours
from tests.conftest import need_root
from tests.integration.links import WAN1, WAN2, two_uplinks
from tests.poll import poll

pytestmark = pytest.mark.root

HOST1, HOST2 = "198.18.1.2", "198.18.1.3"
SERVER = "198.19.99.1"
PORT = 9000

ROUTER_NFT = f"""
table inet lab {{
    counter fwd_established {{ }}
    chain forward {{
        type filter hook forward priority 0; policy accept;
        ct state established,related counter name fwd_established accept
    }}
    chain mangle_prerouting {{
        type filter hook prerouting priority mangle; policy accept;
        iifname "br-lan" ip saddr {HOST2} ct mark set 0x200
        meta mark set ct mark
    }}
    chain postrouting {{
        type nat hook postrouting priority 100;
        oifname "wan1" masquerade
        oifname "wan2" masquerade
    }}
}}
"""

# Who reaches the server over which uplink with which source. rp_filter drops
# spoofed packets after prerouting, so "spoofed" counts them before the drop.
INTERNET_NFT = f"""
table inet srv {{
    counter via_wan1 {{ }}
    counter via_wan2 {{ }}
    counter spoofed {{ }}
    chain prerouting {{
        type filter hook prerouting priority 0; policy accept;
        iifname "i1" ip saddr != {WAN1} counter name spoofed
        iifname "i2" ip saddr != {WAN2} counter name spoofed
    }}
    chain input {{
        type filter hook input priority 0; policy accept;
        iifname "i1" ip saddr {WAN1} counter name via_wan1
        iifname "i2" ip saddr {WAN2} counter name via_wan2
    }}
}}
"""


def _build(topo: Topology) -> None:
    r, internet = topo.router, topo.wan
    two_uplinks(topo, [(topo.lan1, "lan1p"), (topo.lan2, "lan2p")], ROUTER_NFT)
    # Connected networks first (mwan3 does the same), then the mark.
    r.sh("ip rule add priority 100 lookup main suppress_prefixlength 0"
         " && ip rule add priority 200 fwmark 0x200/0x300 lookup 102")
    internet.sh(f"ip addr add {SERVER}/32 dev lo")
    internet.sh("sysctl -qw net.ipv4.conf.all.rp_filter=1 net.ipv4.conf.default.rp_filter=1"
                " net.ipv4.conf.i1.rp_filter=1 net.ipv4.conf.i2.rp_filter=1")
    internet.sh("nft -f -", input=INTERNET_NFT)
    for host, addr in ((topo.lan1, HOST1), (topo.lan2, HOST2)):
        host.sh(f"ip addr add {addr}/24 dev eth0 && ip route add default via 198.18.1.1")
    warm_neighbours({topo.lan1: ("198.18.1.1",), topo.lan2: ("198.18.1.1",),
                     r: (HOST1, HOST2, "198.19.10.2", "198.19.20.2")})


@pytest.fixture(params=["xdp", "tc"], scope="module")
def multiwan(request: pytest.FixtureRequest, bpf_object: Any) -> Iterator[Topology]:
    need_root()
    topo = Topology(tag=secrets.token_hex(2))
    topo.wan_if = "wan1"  # start_agent names br-lan and this; wan2 comes as an extra
    try:
        _build(topo)
        topo.start_agent(hook=request.param, extra=["-i", "wan2"])
        yield topo
    finally:
        topo.down()


def _counter(host: Host, table: str, name: str, what: str = "packets") -> int:
    out = host.sh(f"nft -j list counter inet {table} {name}").stdout
    return next(int(i["counter"][what]) for i in json.loads(out)["nftables"] if "counter" in i)


CASES = [("tcp", 1), ("tcp", 2), ("udp", 1), ("udp", 2)]


@pytest.mark.parametrize("proto,host", CASES, ids=[f"{p}-host{h}" for p, h in CASES])
def test_each_host_leaves_by_its_own_uplink(multiwan: Topology, proto: str, host: int) -> None:
    topo = multiwan
    src, addr = (topo.lan1, HOST1) if host == 1 else (topo.lan2, HOST2)
    uplink, other = ("wan1", "wan2") if host == 1 else ("wan2", "wan1")
    far, far_other = ("i1", "i2") if host == 1 else ("i2", "i1")
    # TCP paced to about 2 s: status polls on a loaded machine must see it
    # offloaded before its FIN hands it back.
    size, rate = (6_000_000, 3_000_000) if proto == "tcp" else (2_000_000, 2000)
    expected = size // (1448 if proto == "tcp" else 1000)
    # Bytes, not packets: GRO on the far ends merges TCP segments before input.
    names = ("via_wan1", "via_wan2", "spoofed")
    before = {n: _counter(topo.wan, "srv", n, "bytes") for n in names}
    rx_before = {d: topo.wan.link_stat(d, "rx_bytes") for d in ("i1", "i2")}
    est_before = _counter(topo.router, "lab", "fwd_established")

    result: dict[str, Any] = {}

    def go() -> None:
        try:
            result.update(_transfer(src, topo.wan, SERVER, PORT, PORT, proto, 4, size, 40.0,
                                    rate, 0))
        except Exception as exc:  # reported below
            result["error"] = repr(exc)

    t = threading.Thread(target=go)
    t.start()
    seen = 0
    deadline = time.monotonic() + 60
    while t.is_alive() and time.monotonic() < deadline:
        for f in (topo.status(check=False) or {"flows": []})["flows"]:
            if (f["proto"] == proto and f["src"] == addr and f["dport"] == PORT
                    and f["state"] == "offloaded"):
                seen = max(seen, f["packets"])
        time.sleep(0.05)
    t.join(timeout=60)

    delta = {n: _counter(topo.wan, "srv", n, "bytes") - v for n, v in before.items()}
    rx = {d: topo.wan.link_stat(d, "rx_bytes") - v for d, v in rx_before.items()}
    est = _counter(topo.router, "lab", "fwd_established") - est_before
    assert result.get("intact"), (result, delta, rx, topo.read_agent_log()[-2000:])
    # Offloaded: the datapath carried the bulk, the kernel's forward path little.
    assert seen > 0.5 * expected, (seen, expected)
    assert est < 0.4 * expected, (est, expected)
    # The server saw this host's own uplink address, arriving over that uplink,
    # and nothing spoofed; the uplink's far end received the packets.
    assert delta[f"via_{uplink}"] >= size, delta
    assert delta[f"via_{other}"] == 0 and delta["spoofed"] == 0, delta
    assert rx[far] >= size, rx
    assert rx[far_other] < 0.1 * size, rx


def test_a_changed_connection_mark_moves_the_connection_as_the_kernel_does(
        multiwan: Topology) -> None:
    """mwan3 moves a connection to the other uplink by changing its conntrack
    mark: the offloaded flow, looked up with the old mark, is handed back.
    Masquerade bound the connection to WAN1's address; out of WAN2 the kernel
    kills it at its next packet (nf_nat_oif_changed) rather than send WAN1's
    address there, and the agent never forwards it out of WAN2 with WAN1's
    address either (it keeps such a flow with the kernel: nat-device). The
    sender's next packets make a fresh connection, which (mark 0 now) is
    masqueraded out of WAN1 and offloaded again."""
    topo = multiwan
    sport = 47000
    t = threading.Thread(target=lambda: _transfer(topo.lan1, topo.wan, SERVER, PORT + 1, PORT + 1,
                                                  "udp", 4, 8_000_000, 15.0, 1000, sport))
    t.start()
    seen: list[tuple[str, Any]] = []

    def flow() -> dict[str, Any] | None:
        for f in (topo.status(check=False) or {"flows": []})["flows"]:
            if (f["proto"], f["src"], f["sport"], f["state"]) == ("udp", HOST1, sport,
                                                                 "offloaded"):
                seen.append((f["out_dev"], (f.get("nat") or {}).get("src")))
                return f
        return None

    def marks() -> list[str]:
        out = topo.router.sh(f"conntrack -L -p udp --orig-src {HOST1} --sport {sport} "
                             "2>/dev/null", check=False).stdout
        return [w for w in out.split() if w.startswith("mark=")]

    try:
        first = poll(flow)
        assert first is not None and first["out_dev"] == "wan1", first
        spoofed = _counter(topo.wan, "srv", "spoofed")
        topo.router.sh(f"conntrack -U -p udp --orig-src {HOST1} --sport {sport} --mark 0x200 "
                       ">/dev/null")
        assert poll(lambda: (topo.status(check=False) or {"agent": {"torn_down": {}}})
                    ["agent"]["torn_down"].get("conntrack-mark", 0) >= 1)
        seen.clear()
        again = poll(lambda: marks() == ["mark=0"] and (f := flow()) is not None
                     and f["out_dev"] == "wan1" and f, timeout=15)
        assert again, (marks(), seen, topo.read_agent_log()[-2000:])
        assert ("wan2", WAN1) not in seen, seen
        assert _counter(topo.wan, "srv", "spoofed") == spoofed
    finally:
        t.join(timeout=30)


def test_a_per_packet_mark_keeps_the_flow_with_the_kernel(multiwan: Topology) -> None:
    """An nft rule sets the packet mark per packet, from the DSCP field
    (which conntrack does not know), and lan1's connection carries conntrack
    mark 0: which uplink a packet takes cannot be told from conntrack, so
    the flow stays with the kernel, and status names the reason for that
    very flow. The rule matches no packet of this transfer (DSCP 0), so the
    kernel routes it all out of WAN1, intact."""
    topo = multiwan
    sport, port = 47100, PORT + 2
    topo.router.sh("nft -f -", input=f"""
table inet permark {{
    chain pre {{
        type filter hook prerouting priority mangle + 1; policy accept;
        ip saddr {HOST1} ip dscp cs1 meta mark set 0x200
    }}
}}
""")
    try:
        before = _counter(topo.wan, "srv", "via_wan1", "bytes")
        result: dict[str, Any] = {}
        t = threading.Thread(target=lambda: result.update(_transfer(
            topo.lan1, topo.wan, SERVER, port, port, "udp", 4, 2_000_000, 20.0, 1000, sport)))
        t.start()
        rows: list[dict[str, Any]] = []

        def ours() -> dict[str, Any] | None:
            for f in (topo.status(check=False) or {"flows": []})["flows"]:
                if (f["proto"], f["src"], f["sport"], f["dport"]) == ("udp", HOST1, sport, port):
                    rows.append(f)
                    if f["state"] == "passed":
                        return f
            return None

        passed = poll(ours)
        t.join(timeout=40)
        assert passed, (rows[-3:], topo.read_agent_log()[-2000:])
        assert passed.get("why") == "policy-mark", passed
        assert all(r["state"] != "offloaded" for r in rows), rows
        assert result.get("intact"), result
        assert _counter(topo.wan, "srv", "via_wan1", "bytes") - before >= 2_000_000
        st = topo.status()
        assert st is not None and st["agent"]["passed_by_reason"].get("policy-mark", 0) >= 1
    finally:
        topo.router.sh("nft delete table inet permark")
