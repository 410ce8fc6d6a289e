"""A LAN host whose frames reach the router as a NIC's would: as XDP frames
in the router port's NAPI, with no skb built before the router.

On the lab's plain veth, lan1's TCP segments arrive at the router as the
skbs lan1's own stack built (cloned, since TCP keeps them for
retransmission): the kernel's path is spared the skb a NIC driver would
build, and XDP must first copy each one into an xdp_buff, a copy no NIC
makes. Here the sender ``nic`` is wired to a router port ``lan3p`` (in
br-lan) through a namespace ``wire`` whose two veths run
``bench/wire.bpf.c``: each frame is redirected out of the other veth as an
XDP frame, so lan3p's NAPI receives it as a driver receives a frame from its
ring (XDP runs on it in place; the kernel's path builds the skb there).

One difference from a NIC stays: an skb built from an XDP frame carries no
receive checksum result, so GRO checks each TCP segment's checksum in
software, which a NIC with receive checksum offload spares the kernel's
path (docs/performance.md has what it costs).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import struct
from collections.abc import Iterator
from pathlib import Path

from bench import tools
from offloader.lab import LAN4, ROUTER_LAN4, Host, Topology, _run

NIC_4 = LAN4 + "50"  # the sender's address, in the LAN's /24
PORT = "lan3p"  # the router's port towards the sender


@contextlib.contextmanager
def nic_sender(topo: Topology, obj: Path) -> Iterator[Host]:
    """The sender host, wired to the router's ``lan3p``; removed with its
    namespaces (and so lan3p) on the way out, also on failure."""
    nic, wire = Host(f"ofl-{topo.tag}-nic"), Host(f"ofl-{topo.tag}-wire")
    added: list[Host] = []
    try:
        for h in (nic, wire):
            _run(["ip", "netns", "add", h.name])
            added.append(h)
            topo.hosts.append(h)  # topo.down() removes them if we do not get to
            h.sh("ip link set lo up")
        a, b, c, d = (f"v{secrets.token_hex(4)}" for _ in range(4))
        _run(["ip", "link", "add", a, "type", "veth", "peer", "name", b])
        _run(["ip", "link", "add", c, "type", "veth", "peer", "name", d])
        _run(["ip", "link", "set", a, "netns", nic.name, "name", "eth0"])
        _run(["ip", "link", "set", b, "netns", wire.name, "name", "wa"])
        _run(["ip", "link", "set", c, "netns", wire.name, "name", "wb"])
        _run(["ip", "link", "set", d, "netns", topo.router.name, "name", PORT])
        # The sender completes its checksums (an XDP redirect drops
        # CHECKSUM_PARTIAL) and sends MTU frames; GRO on gives its veth the
        # NAPI that takes redirected frames (the ACKs).
        nic.sh("ip link set eth0 up && ethtool -K eth0 tx off tso off gso off gro on >/dev/null")
        nic.sh(f"ip addr add {NIC_4}/24 dev eth0 && ip route add default via {ROUTER_LAN4}")
        topo.router.sh(f"ip link set {PORT} up && ip link set {PORT} master br-lan"
                       f" && ethtool -K {PORT} tx off gro on >/dev/null")
        # The wire sends nothing of its own (no IPv6 link-local, no ND):
        # every frame lan3p receives is one of the sender's.
        wire.sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1"
                " && ip link set wa up && ip link set wb up")
        ia, ib = tools.ifindex_of(wire, "wa"), tools.ifindex_of(wire, "wb")
        for dev in ("wa", "wb"):
            wire.sh(f"ip link set dev {dev} xdpdrv obj {obj} sec xdp")
            info = json.loads(wire.sh(f"ip -j -d link show dev {dev}").stdout)[0]
            peer = tools.prog_maps(int(info["xdp"]["prog"]["id"]))["wire_peer"]
            for src, dst in ((ia, ib), (ib, ia)):
                tools.map_update(peer, struct.pack("<I", src), struct.pack("<I", dst), host=wire)
        yield nic
    finally:
        # The port first: a namespace's devices go some time after
        # `ip netns del` returns, and the router would keep lan3p meanwhile.
        topo.router.sh(f"ip link del {PORT}", check=False)
        for h in added:
            _run(["ip", "netns", "del", h.name], check=False)
            topo.hosts.remove(h)
