"""Links between lab hosts for the tests that build their own topology."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from offloader.lab import Host, Topology, _run, fixed_mac


def wire(a: Host, a_dev: str, b: Host, b_dev: str) -> None:
    """A veth pair from ``a`` (``a_dev``) to ``b`` (``b_dev``), both ends up,
    set as offloaded packet counts need them: complete checksums
    (CHECKSUM_PARTIAL does not survive an XDP redirect on veth), no TSO/GSO
    (packet counts mean packets), GRO on (veth delivers XDP redirects only
    then)."""
    x, y = f"v{secrets.token_hex(4)}", f"v{secrets.token_hex(4)}"
    _run(["ip", "link", "add", x, "type", "veth", "peer", "name", y])
    _run(["ip", "link", "set", x, "netns", a.name, "name", a_dev])
    _run(["ip", "link", "set", y, "netns", b.name, "name", b_dev])
    for host, dev in ((a, a_dev), (b, b_dev)):
        host.sh(f"ip link set {dev} up && ethtool -K {dev} tx off tso off gso off gro on >/dev/null")


WAN1, WAN2 = "198.19.10.1", "198.19.20.1"  # the router's addresses on its two uplinks


def two_uplinks(topo: Topology, lans: Sequence[tuple[Host, str]], router_nft: str) -> None:
    """The router with br-lan (198.18.1.1/24, a port per LAN host given with
    its port's name) and two uplinks to one internet namespace (``topo.wan``):
    wan1 198.19.10.1 -- i1 198.19.10.2, wan2 198.19.20.1 -- i2 198.19.20.2.
    The main table's default route is wan1, table 102's is wan2; the router
    forwards, with rp_filter off and ``router_nft`` loaded. Rules, the
    internet's servers and filters, and the LAN hosts' addresses are the
    caller's."""
    r, internet = topo.router, topo.wan
    for h in (r, *(host for host, _ in lans), internet):
        _run(["ip", "netns", "add", h.name])
        h.sh("ip link set lo up")
    r.sh(f"ip link add br-lan address {fixed_mac()} type bridge && ip link set br-lan up")
    for host, port in lans:
        wire(host, "eth0", r, port)
        r.sh(f"ip link set {port} master br-lan")
    wire(r, "wan1", internet, "i1")
    wire(r, "wan2", internet, "i2")
    r.sh(f"ip addr add 198.18.1.1/24 dev br-lan && ip addr add {WAN1}/24 dev wan1"
         f" && ip addr add {WAN2}/24 dev wan2")
    # Per-namespace settings of the router namespace only.
    r.sh("sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0"
         " net.ipv4.conf.default.rp_filter=0")
    r.sh("ip route add default via 198.19.10.2 dev wan1"
         " && ip route add default via 198.19.20.2 dev wan2 table 102")
    r.sh("nft -f -", input=router_nft)
    internet.sh("ip addr add 198.19.10.2/24 dev i1 && ip addr add 198.19.20.2/24 dev i2")
