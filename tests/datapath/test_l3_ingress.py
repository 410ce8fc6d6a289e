"""Live: TC on a device without an L2 header, the way TC mode receives from a
ppp device (this kernel has no PPP; a tun device is the same kind of device:
ARPHRD_NONE, packets start at the IP header). The program parses from the
IP header, pushes an Ethernet header with bpf_skb_change_head() and
redirects out of a veth; the datagrams arrive intact, TTL decremented, SNAT
applied, counted.

    writer --(tun0, router ns)-- TC ofl_tc --> r1 ==veth== b0 (b ns, 198.18.2.2)
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from offloader.bpfobj import tc_attach, tc_detach
from offloader.datapath import Datapath, FlowKey, L2Header, Verdict
from tests import nsutil

from .test_live import inside

pytestmark = pytest.mark.root

SRC, DST, NAT_SRC = "198.18.50.2", "198.18.2.2", "198.18.2.1"
COUNT = 100

# Runs in the router namespace: attaches to the persistent tun0 and writes
# COUNT IPv4/UDP datagrams into it, as a ppp device would deliver them.
WRITER = r"""
import fcntl, os, struct, sys
from scapy.layers.inet import IP, UDP
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", b"tun0", 0x0001 | 0x1000))  # TUNSETIFF: TUN, NO_PI
for i in range(int(sys.argv[1])):
    pkt = IP(src="198.18.50.2", dst="198.18.2.2", ttl=64) / UDP(sport=4444, dport=5555) / (b"%05d" % i * 40)
    os.write(fd, bytes(pkt))
"""

RECEIVER = r"""
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_IP, 12, 1)  # IP_RECVTTL
s.bind(("198.18.2.2", 5555)); s.settimeout(3)
print("ready", flush=True)
got = []
while len(got) < int(sys.argv[1]):
    try:
        data, anc, _, peer = s.recvmsg(4096, 64)
    except socket.timeout:
        break
    ttl = [int.from_bytes(d[:4], "little") for lvl, t, d in anc if t == 2]
    got.append([data.decode(), peer[0], peer[1], ttl[0] if ttl else None])
print(json.dumps(got))
"""


def test_tc_on_an_l3_device_pushes_ethernet_and_redirects(bpf_object: Path) -> None:
    with nsutil.namespaces("r", "b") as (r, b):
        r.run("ip tuntap add dev tun0 mode tun")
        r.run("ip link set tun0 up")
        r.run("ip addr add 198.18.50.1/24 dev tun0")
        nsutil.veth(r, "r1", b, "b0")
        r.run("ip addr add 198.18.2.1/24 dev r1")
        b.run(f"ip addr add {DST}/24 dev b0")
        dp = Datapath(str(bpf_object), max_flows=1024)
        try:
            dp.configure(heartbeat_timeout=600.0)
            tun, r1 = r.ifindex("tun0"), r.ifindex("r1")
            dp.set_iface(tun, l3=True)
            key = FlowKey(ifindex=tun, family=socket.AF_INET, proto=socket.IPPROTO_UDP,
                          src=ipaddress.ip_address(SRC), dst=ipaddress.ip_address(DST),
                          sport=4444, dport=5555)
            verdict = Verdict(oif=r1, l2=L2Header(dmac=b.mac("b0"), smac=r.mac("r1")),
                              mtu=1500, key=key, nat_src=ipaddress.ip_address(NAT_SRC))
            with inside(r):  # the devmap resolves the ifindex in the router namespace
                dp.offload(key, verdict)
                tc_attach(tun, dp.tc)
            try:
                recv = b.popen([sys.executable, "-c", RECEIVER, str(COUNT)],
                               stdout=subprocess.PIPE)
                assert recv.stdout is not None and recv.stdout.readline().strip() == "ready"
                r.run([sys.executable, "-c", WRITER, str(COUNT)])
                out, _ = recv.communicate(timeout=30)
            finally:
                with inside(r):
                    tc_detach(tun)
            got = json.loads(out.strip().splitlines()[-1])
            assert len(got) == COUNT  # every datagram came through the redirect
            for i, (payload, peer, port, ttl) in enumerate(got):
                assert payload == f"{i:05d}" * 40
                assert (peer, port) == (NAT_SRC, 4444)  # SNAT applied, checksum accepted
                assert ttl == 63
            (entry,) = list(dp.flow_entries())
            assert entry.packets == COUNT
            assert dp.stats()["redirect"] == COUNT
        finally:
            dp.close()
