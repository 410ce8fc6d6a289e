"""The built-in lab: LAN hosts, a router and a WAN host in network namespaces.

    lan1 --+
           +-- br-lan [router] wan0 ---- wan
    lan2 --+

The router masquerades LAN traffic out of wan0 and forwards WAN port 8080 to
lan1:80 (DNAT). Addresses come from 198.18.0.0/15 and 2001:db8::/32 only.
Everything is removed on exit, Ctrl-C included. The same class builds the
integration tests' network.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

LAN4, LAN6 = "198.18.1.", "2001:db8:1::"
WAN4, WAN6 = "198.19.2.", "2001:db8:2::"
ROUTER_LAN4, ROUTER_WAN4 = LAN4 + "1", WAN4 + "1"
ROUTER_LAN6, ROUTER_WAN6 = LAN6 + "1", WAN6 + "1"
LAN1_4, LAN2_4, WAN_4 = LAN4 + "2", LAN4 + "3", WAN4 + "2"
LAN1_6, LAN2_6, WAN_6 = LAN6 + "2", LAN6 + "3", WAN6 + "2"
DNAT_PORT = 8080

NFT_RULES = """
table inet lab {
    chain forward {
        type filter hook forward priority 0; policy accept;
        ct state established,related counter name fwd_established accept
        counter name fwd_other
    }
    counter fwd_established { }
    counter fwd_other { }
    chain prerouting {
        type nat hook prerouting priority -100;
        iifname "wan0" tcp dport 8080 dnat ip to 198.18.1.2:80
        iifname "wan0" udp dport 8080 dnat ip to 198.18.1.2:80
        iifname "wan0" tcp dport 8080 dnat ip6 to [2001:db8:1::2]:80
        iifname "wan0" udp dport 8080 dnat ip6 to [2001:db8:1::2]:80
    }
    chain postrouting {
        type nat hook postrouting priority 100;
        oifname "wan0" meta mark != 0x1 masquerade
    }
}
"""


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 60,
         input: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc


class Host:
    def __init__(self, name: str) -> None:
        self.name = name

    def argv(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def sh(self, cmd: str, *, check: bool = True, timeout: float = 60,
           input: str | None = None) -> subprocess.CompletedProcess[str]:
        return _run(self.argv("sh", "-c", cmd), check=check, timeout=timeout, input=input)

    def popen(self, *cmd: str, **kw: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*cmd), text=True, **kw)

    def link_stat(self, dev: str, name: str) -> int:
        """One of ``dev``'s counters (``rx_packets``, ``tx_bytes``, ...: the names in
        /sys/class/net/DEV/statistics, the kernel's 64-bit link statistics)."""
        return int(self.sh(f"cat /sys/class/net/{dev}/statistics/{name}").stdout)

    def ethtool_stats(self, dev: str) -> dict[str, int]:
        """``ethtool -S dev`` by name (a veth's per-queue XDP counters); empty when
        the driver reports none."""
        out = self.sh(f"ethtool -S {dev}", check=False).stdout
        pairs = (line.split(":", 1) for line in out.splitlines()[1:] if ":" in line)
        return {k.strip(): int(v) for k, v in pairs if v.strip().isdigit()}


# One UDP datagram to each address (the discard port; an ICMP error back is
# fine): sending it makes the kernel resolve the neighbour (ARP, ND), with
# nothing but the Python that runs the lab (a fresh Debian has no ping).
_POKE = r"""
import socket, sys
for addr in sys.argv[1:]:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(b"warm-up", (addr, 9))
        except OSError as exc:  # e.g. no route yet: sent again next round
            print(addr, exc, file=sys.stderr)
"""
WARM_UP_S = 5.0  # IPv6 waits for the link-local addresses' DAD (about 1-2 s)


def fixed_mac() -> str:
    """A random locally administered MAC for a bridge. A bridge without one
    set takes its lowest port's MAC, and takes another when a port with a
    lower one joins. A host that cached the old one then sends to a port's
    own MAC: the bridge delivers the frame locally, but it was marked for
    another host when it arrived on a different port, and IP drops it.
    OpenWrt's netifd sets br-lan's MAC; so does the lab."""
    return "02:" + ":".join(secrets.token_hex(1) for _ in range(5))


def unresolved(host: Host, addrs: Sequence[str]) -> list[str]:
    """The addresses ``host`` has no usable neighbour entry for."""
    entries = json.loads(host.sh("ip -j neigh show").stdout or "[]")
    known = {e.get("dst") for e in entries
             if e.get("lladdr") and not {"FAILED", "INCOMPLETE"} & set(e.get("state", ()))}
    return [a for a in addrs if a not in known]


def warm_neighbours(want: dict[Host, Sequence[str]], timeout: float = WARM_UP_S) -> bool:
    """Make each host resolve the addresses given for it, polling (bounded)
    until every one is resolved. False, and a line on stderr naming what is
    not, when some are still unresolved at the end: their first packets then
    wait on ARP/ND, which tests and measurements should know."""
    deadline = time.monotonic() + timeout
    missing = {h: list(a) for h, a in want.items()}
    errors: list[str] = []
    while missing:
        errors = []  # of the last round
        for host, addrs in missing.items():
            proc = _run(host.argv(sys.executable, "-c", _POKE, *addrs), check=False)
            errors += [f"{host.name}: {line}" for line in proc.stderr.splitlines() if line.strip()]
        time.sleep(0.1)
        missing = {h: m for h, a in missing.items() if (m := unresolved(h, a))}
        if time.monotonic() >= deadline:
            break
    if missing:
        names = "; ".join(f"{h.name}: {', '.join(a)}" for h, a in missing.items())
        print(f"lab: neighbour warm-up failed after {timeout:.0f} s, still unresolved: {names}"
              f"{' (' + '; '.join(errors[-3:]) + ')' if errors else ''}", file=sys.stderr)
        return False
    return True


class Topology:
    """The lab network. ``nat=False`` routes without NAT (the WAN host gets a
    route back to the LAN)."""

    def __init__(self, *, nat: bool = True, tag: str = "", wan_macvlan: bool = False) -> None:
        tag = tag or secrets.token_hex(2)
        self.tag = tag
        self.router = Host(f"ofl-{tag}-router")
        self.lan1 = Host(f"ofl-{tag}-lan1")
        self.lan2 = Host(f"ofl-{tag}-lan2")
        self.wan = Host(f"ofl-{tag}-wan")
        self.hosts = [self.router, self.lan1, self.lan2, self.wan]
        self.nat = nat
        # With wan_macvlan the router's WAN addresses sit on a macvlan device
        # (wanm) on top of wan0, as on routers that give the WAN its own MAC.
        self.wan_macvlan = wan_macvlan
        self.wan_if = "wanm" if wan_macvlan else "wan0"
        self.agent: subprocess.Popen[str] | None = None

    # -- building -------------------------------------------------------------
    def up(self) -> None:
        for h in self.hosts:
            _run(["ip", "netns", "add", h.name])
            h.sh("ip link set lo up")
        r = self.router
        r.sh(f"ip link add br-lan address {fixed_mac()} type bridge && ip link set br-lan up")
        self._veth(self.lan1, "eth0", "lan1p", master="br-lan")
        self._veth(self.lan2, "eth0", "lan2p", master="br-lan")
        self._veth(self.wan, "eth0", "wan0")
        if self.wan_macvlan:
            r.sh("ip link add wanm link wan0 type macvlan mode bridge && ip link set wanm up")
        w = self.wan_if
        r.sh(f"ip addr add {ROUTER_LAN4}/24 dev br-lan && ip addr add {ROUTER_LAN6}/64 dev br-lan nodad"
             f" && ip addr add {ROUTER_WAN4}/24 dev {w} && ip addr add {ROUTER_WAN6}/64 dev {w} nodad")
        # Per-namespace settings of the router namespace, not global ones.
        # arp_ignore=1 as OpenWrt sets it (/etc/sysctl.d/10-default.conf):
        # only the device that has the address answers ARP for it. With
        # Linux's default 0, wan0 under the macvlan answers for wanm's
        # address too, and first: a WAN peer that resolves the router
        # itself then sends to wan0's MAC, its frames enter through wan0
        # (the TC hook on wanm never sees them, the port forward on wanm
        # does not match) until the router's next ARP probe repairs it.
        r.sh("sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1"
             " net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.default.arp_ignore=1")
        for host, a4, a6, gw4, gw6 in ((self.lan1, LAN1_4, LAN1_6, ROUTER_LAN4, ROUTER_LAN6),
                                       (self.lan2, LAN2_4, LAN2_6, ROUTER_LAN4, ROUTER_LAN6),
                                       (self.wan, WAN_4, WAN_6, None, None)):
            host.sh(f"ip addr add {a4}/24 dev eth0 && ip addr add {a6}/64 dev eth0 nodad")
            if gw4:
                host.sh(f"ip route add default via {gw4} && ip -6 route add default via {gw6}")
            # Senders complete their own checksums (veth's CHECKSUM_PARTIAL
            # does not survive an XDP redirect), and accept redirected frames
            # (veth delivers XDP_REDIRECT only with GRO on or an XDP program).
            host.sh("ethtool -K eth0 tx off gro on >/dev/null")
        if not self.nat:
            self.wan.sh(f"ip route add {LAN4}0/24 via {ROUTER_WAN4} && "
                        f"ip -6 route add {LAN6}/64 via {ROUTER_WAN6}")
        rules = NFT_RULES if self.nat else NFT_RULES.replace("masquerade", "accept")
        rules = rules.replace('"wan0"', f'"{self.wan_if}"')
        r.sh("nft -f -", input=rules)
        # Neighbours resolved up front so the first flows do not wait on ARP/ND.
        warm_neighbours({self.lan1: (ROUTER_LAN4, ROUTER_LAN6),
                         self.lan2: (ROUTER_LAN4, ROUTER_LAN6),
                         self.wan: (ROUTER_WAN4, ROUTER_WAN6),
                         self.router: (LAN1_4, LAN1_6, LAN2_4, LAN2_6, WAN_4, WAN_6)})

    def _veth(self, host: Host, host_dev: str, router_dev: str, master: str = "") -> None:
        a, b = f"v{secrets.token_hex(4)}", f"v{secrets.token_hex(4)}"
        _run(["ip", "link", "add", a, "type", "veth", "peer", "name", b])
        _run(["ip", "link", "set", a, "netns", host.name, "name", host_dev])
        _run(["ip", "link", "set", b, "netns", self.router.name, "name", router_dev])
        host.sh(f"ip link set {host_dev} up")
        self.router.sh(f"ip link set {router_dev} up")
        if master:
            self.router.sh(f"ip link set {router_dev} master {master}")
        self.router.sh(f"ethtool -K {router_dev} tx off gro on >/dev/null")

    def down(self) -> None:
        self.stop_agent()
        if hasattr(self, "agent_log_path") and not os.environ.get("OFL_KEEP_LOGS"):
            with contextlib.suppress(OSError):
                os.unlink(self.agent_log_path)
        # An agent run with nsenter pinned its maps on the host's BPF
        # filesystem, per namespace (and leaves them for a restart): they go
        # too, and the top directory once nothing else is in it.
        with contextlib.suppress(OSError):
            pins = self.pin_dir()
            shutil.rmtree(pins, ignore_errors=True)
            os.rmdir(os.path.dirname(pins))
        for h in self.hosts:
            pids = _run(["ip", "netns", "pids", h.name], check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _run(["ip", "netns", "del", h.name], check=False)

    def pin_dir(self) -> str:
        """Where an agent started with ``nsenter`` pins its maps (the host's
        BPF filesystem, per network namespace: datapath.netns_pin_dir)."""
        inode = os.stat(f"/run/netns/{self.router.name}").st_ino
        return f"/sys/fs/bpf/ebpf-offloader/netns-{inode}"

    # -- the agent ------------------------------------------------------------------
    def start_agent(self, hook: str = "xdp", extra: Sequence[str] = (),
                    wait: float = 15.0, nsenter: bool = False, verbose: bool = True) -> None:
        """Run the agent in the router namespace, through ``ip netns exec``
        (its own /sys, no BPF filesystem: nothing pinned) or, with
        ``nsenter``, ``nsenter --net`` (the host's mounts: maps pinned under
        /sys/fs/bpf/ebpf-offloader/netns-<inode>)."""
        argv = [sys.executable, "-m", "offloader.cli", "run", "-i", "br-lan", "-i", self.wan_if,
                "--hook", hook, *(["-v"] if verbose else []), *extra]
        self._agent_out = open(os.devnull, "w")  # noqa: SIM115 (closed in stop_agent)
        self.agent_log_path = f"/tmp/ofl-{self.tag}-agent.log"
        logf = open(self.agent_log_path, "w")  # noqa: SIM115
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        if nsenter:
            self.agent = subprocess.Popen(["nsenter", f"--net=/run/netns/{self.router.name}", *argv],
                                          stdout=logf, stderr=subprocess.STDOUT, env=env, text=True)
        else:
            self.agent = self.router.popen(*argv, stdout=logf, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.agent.poll() is not None:
                raise RuntimeError(f"agent exited: {self.read_agent_log()[-3000:]}")
            if self.status(check=False) is not None:
                return
            time.sleep(0.1)
        raise RuntimeError(f"agent did not come up: {self.read_agent_log()[-3000:]}")

    def read_agent_log(self) -> str:
        try:
            with open(self.agent_log_path) as f:
                return f.read()
        except (OSError, AttributeError):
            return ""

    def stop_agent(self, sig: int = signal.SIGTERM) -> None:
        if self.agent is None:
            return
        if self.agent.poll() is None:
            self.agent.send_signal(sig)
            try:
                self.agent.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait(timeout=5)
        self.agent = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        proc = subprocess.run(self.router.argv(sys.executable, "-m", "offloader.cli", *args),
                              capture_output=True, text=True, timeout=30, env=env)
        if check and proc.returncode != 0:
            raise RuntimeError(f"ebpf-offloader {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def status(self, check: bool = True, limit: int = 0) -> dict[str, Any] | None:
        """The agent's status report; with ``limit`` only the busiest flows
        (counts cover all), which keeps a report on 100,000 flows small."""
        proc = self.cli("status", "--json", *(["--limit", str(limit)] if limit else []),
                        check=check)
        if proc.returncode != 0:
            return None
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def nft_counter(self, name: str) -> tuple[int, int]:
        out = self.router.sh(f"nft -j list counter inet lab {name}").stdout
        for item in json.loads(out)["nftables"]:
            if "counter" in item:
                return int(item["counter"]["packets"]), int(item["counter"]["bytes"])
        return 0, 0

    # -- traffic -----------------------------------------------------------------------
    def transfer(self, *, proto: str = "tcp", family: int = 4, size: int = 4_000_000,
                 dnat: bool = False, timeout: float = 60.0, rate_pps: int = 0,
                 sport: int = 0) -> dict[str, Any]:
        """Send ``size`` random bytes from lan1 to the WAN host (or, with
        ``dnat``, from the WAN host to lan1 through the port forward) and
        return what arrived, with hashes."""
        if dnat:
            src, dst = self.wan, self.lan1
            target = ROUTER_WAN4 if family == 4 else ROUTER_WAN6
            port, listen = DNAT_PORT, 80
        else:
            src, dst = self.lan1, self.wan
            target = WAN_4 if family == 4 else WAN_6
            port, listen = 9000, 9000
        return _transfer(src, dst, target, port, listen, proto, family, size, timeout,
                         rate_pps, sport)


# A tiny sender/receiver pair, run with the same Python inside the namespaces:
# TCP streams the bytes; UDP sends numbered 1,000-byte datagrams at a bounded
# rate and the receiver reports what arrived.
_PEER = r"""
import hashlib, os, socket, sys, time
mode, proto, fam, host, port, size, rate, sport = sys.argv[1:9]
fam = socket.AF_INET if fam == "4" else socket.AF_INET6
port, size, rate, sport = int(port), int(size), int(rate), int(sport)
kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
deadline = time.monotonic() + float(os.environ.get("PEER_TIMEOUT", "60"))
if mode == "recv":
    s = socket.socket(fam, kind); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # UDP: room for a few seconds of datagrams while this process waits for
    # a CPU (SO_RCVBUFFORCE, root: past rmem_max), so loss means the network's
    if proto == "udp":
        try: s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)
        except OSError: pass
    s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", port))
    h = hashlib.sha256(); got = 0
    print("ready", flush=True)
    if proto == "tcp":
        s.listen(1); c, _ = s.accept(); c.settimeout(30)
        while time.monotonic() < deadline:
            b = c.recv(1 << 16)
            if not b: break
            h.update(b); got += len(b)
    else:
        s.settimeout(3)
        while got < size and time.monotonic() < deadline:
            try: b, _ = s.recvfrom(2048)
            except socket.timeout: break
            h.update(b); got += len(b)
    print(got, h.hexdigest(), flush=True)
else:
    data = os.urandom(size)
    print(hashlib.sha256(data).hexdigest(), flush=True)
    s = socket.socket(fam, kind)
    if sport: s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", sport))
    if proto == "tcp":
        s.settimeout(30); s.connect((host, port))
        view = memoryview(data); step = 1 << 14; i = 0
        while i < len(data) and time.monotonic() < deadline:
            s.sendall(view[i:i + step]); i += step
            if rate: time.sleep(step / rate)
        s.shutdown(socket.SHUT_WR); s.recv(1); s.close()
    else:
        gap = 1.0 / rate if rate else 0
        for i in range(0, len(data), 1000):
            if time.monotonic() > deadline: break
            s.sendto(data[i:i + 1000], (host, port))
            if gap: time.sleep(gap)
"""


def _transfer(src: Host, dst: Host, target: str, port: int, listen: int, proto: str, family: int,
              size: int, timeout: float, rate: int, sport: int) -> dict[str, Any]:
    env = dict(os.environ, PEER_TIMEOUT=str(timeout))
    recv = dst.popen(sys.executable, "-c", _PEER, "recv", proto, str(family), "", str(listen),
                     str(size), "0", "0", stdout=subprocess.PIPE, env=env)
    try:
        assert recv.stdout is not None
        if recv.stdout.readline().strip() != "ready":
            raise RuntimeError("receiver did not start")
        if proto == "udp" and not rate:
            rate = 20000
        send = src.popen(sys.executable, "-c", _PEER, "send", proto, str(family), target, str(port),
                         str(size), str(rate), str(sport), stdout=subprocess.PIPE, env=env)
        start = time.monotonic()
        sent_out, _ = send.communicate(timeout=timeout + 10)
        elapsed = time.monotonic() - start
        recv_out, _ = recv.communicate(timeout=timeout + 10)
    finally:
        for p in (recv,):
            if p.poll() is None:
                p.kill()
    got, digest = recv_out.split()[-2:]
    return {"sent_sha256": sent_out.split()[0], "received": int(got), "received_sha256": digest,
            "intact": sent_out.split()[0] == digest, "seconds": elapsed, "size": size}


@contextlib.contextmanager
def lab_network(*, nat: bool = True, tag: str = "",
                wan_macvlan: bool = False) -> Iterator[Topology]:
    topo = Topology(nat=nat, tag=tag, wan_macvlan=wan_macvlan)
    try:
        topo.up()
        yield topo
    finally:
        topo.down()


def _iperf(topo: Topology, seconds: float, family: int = 4,
           midway: Any = None, client: Host | None = None) -> float:
    """TCP throughput lan1 (or ``client``) -> WAN host in Gbit/s (iperf3);
    ``midway`` is called half way through the run."""
    server = topo.wan.popen("iperf3", "-s", "-1", stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        target = WAN_4 if family == 4 else WAN_6
        proc = (client or topo.lan1).popen("iperf3", "-c", target, "-t", str(seconds), "-J",
                                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        if midway is not None:
            time.sleep(seconds / 2)
            midway()
        out, _ = proc.communicate(timeout=seconds + 30)
        return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        server.kill()
        server.wait()


# -- router CPU, measured as the bench does ------------------------------------------------
def _napi_threads(dev: str) -> set[int]:
    pids = set()
    for comm in glob.glob("/proc/[0-9]*/comm"):
        with contextlib.suppress(OSError):
            with open(comm) as f:
                if f.read().strip().startswith(f"napi/{dev}-"):
                    pids.add(int(comm.split("/")[2]))
    return pids


def threaded_napi(host: Host, dev: str, cpu: int | None = None) -> list[int]:
    """Run ``dev``'s receive work (NAPI) in kthreads of its own, optionally
    pinned to ``cpu``; returns their pids. Their CPU time is what that
    device's receive path costs: for the router's LAN port, the router's
    forwarding work."""
    before = _napi_threads(dev)
    host.sh(f"echo 0 > /sys/class/net/{dev}/threaded", check=False)
    host.sh(f"echo 1 > /sys/class/net/{dev}/threaded")
    time.sleep(0.1)
    pids = sorted(_napi_threads(dev) - before) or sorted(_napi_threads(dev))
    if cpu is not None:
        for pid in pids:
            _run(["taskset", "-p", "-c", str(cpu), str(pid)], check=False)
    return pids


def unthread_napi(host: Host, dev: str) -> None:
    host.sh(f"echo 0 > /sys/class/net/{dev}/threaded", check=False)


def thread_cpu_s(pids: list[int]) -> float:
    """CPU time the given threads ran (schedstat, ns resolution)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/schedstat") as f:
                total += int(f.read().split()[0])
    return total / 1e9


_BURST = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setblocking(False)
end = time.monotonic() + float(sys.argv[2]); sent = 0
while time.monotonic() < end:
    for _ in range(256):
        try:
            s.sendto(b"x" * 22, (sys.argv[1], 9998)); sent += 1
        except BlockingIOError:
            pass
print(sent)
"""


def router_cost(topo: Topology, seconds: float) -> dict[str, float]:
    """Router CPU per GB of TCP (MTU-sized frames from the sender, GRO on at
    the router's LAN port, as frames arrive off a wire) and per small UDP
    packet, from the LAN port's NAPI kthread; the WAN host's receive work
    runs in a kthread of its own, not counted."""
    topo.lan1.sh("ethtool -K eth0 tso off gso off >/dev/null")
    topo.router.sh("ethtool -K lan1p gro on >/dev/null")
    napi = threaded_napi(topo.router, "lan1p")
    threaded_napi(topo.wan, "eth0")
    try:
        c0 = thread_cpu_s(napi)
        gbps = _iperf(topo, seconds)
        tcp_cpu = thread_cpu_s(napi) - c0
        r0, c0 = topo.wan.link_stat("eth0", "rx_packets"), thread_cpu_s(napi)
        burst = topo.lan1.popen(sys.executable, "-c", _BURST, WAN_4, str(min(2.0, seconds)),
                                stdout=subprocess.DEVNULL)
        burst.wait(timeout=30)
        time.sleep(0.2)
        packets = topo.wan.link_stat("eth0", "rx_packets") - r0
        udp_cpu = thread_cpu_s(napi) - c0
    finally:
        unthread_napi(topo.router, "lan1p")
        unthread_napi(topo.wan, "eth0")
    gb = gbps * seconds / 8
    return {"gbps": gbps, "cpu_s_per_gb": tcp_cpu / gb if gb else 0.0,
            "ns_per_packet": udp_cpu * 1e9 / packets if packets else 0.0}


def run_lab(*, seconds: float = 3.0, hook: str = "both") -> int:
    """The README's main job: build the lab, move traffic without and with the
    agent, show what was offloaded and what it saved the router's CPU."""
    if os.geteuid() != 0:
        print("the lab needs root (network namespaces, BPF)", file=sys.stderr)
        return 1
    if shutil.which("iperf3") is None:
        print("the lab needs iperf3 (scripts/setup.sh installs it)", file=sys.stderr)
        return 1
    hooks = ["xdp", "tc"] if hook == "both" else [hook]
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with lab_network() as topo:
            return _lab(topo, seconds, hooks)
    except KeyboardInterrupt:
        print("interrupted; lab removed", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _lab(topo: Topology, seconds: float, hooks: list[str]) -> int:
    print("lab: lan1, lan2 on br-lan -- router (masquerade, DNAT :8080) -- wan")
    print(f"1. kernel slow path: TCP lan1 -> wan ({seconds:.0f} s of iperf3), then a burst of "
          "small UDP packets; router CPU from its LAN port's receive thread ...")
    cost = {"slow path": router_cost(topo, seconds)}
    _show_cost("slow path", cost["slow path"])
    intact: list[bool] = []
    n = 0
    for step, h in enumerate(hooks, start=2):
        print(f"{step}. agent started in the router (hook {h})")
        topo.start_agent(hook=h, verbose=False)
        try:
            if step == 2:
                intact = _payload_checks(topo)
            cost[h] = router_cost(topo, seconds)
            _show_cost(h, cost[h])
            st = topo.status() or {}
            n = max(n, st.get("agent", {}).get("offloaded", 0))
            if step == 2:
                print(topo.cli("status").stdout)
        finally:
            topo.stop_agent()
    base = cost["slow path"]
    print()
    for h in hooks:
        c = cost[h]
        print(f"the router spent {c['cpu_s_per_gb'] / base['cpu_s_per_gb']:.2f}x the CPU per GB "
              f"and {c['ns_per_packet'] / base['ns_per_packet']:.2f}x per small packet with {h}, "
              f"against the kernel slow path ({c['gbps']:.1f} vs {base['gbps']:.1f} Gbit/s: "
              "on veth the sender, not the router, limits a TCP stream)")
    if "xdp" in hooks:
        print("on veth XDP pays a copy per frame that a real NIC does not (the driver turns each "
              "skb the sender built into an xdp_buff), so here tc costs less than xdp, and "
              "hook auto gives a veth tc")
    print(f"every transfer intact: {all(intact)}; flows offloaded: {n}")
    return 0 if intact and all(intact) and n else 1


def _show_cost(label: str, c: dict[str, float]) -> None:
    print(f"   {label}: {c['gbps']:.2f} Gbit/s, router {c['cpu_s_per_gb']:.3f} CPU-s per GB, "
          f"{c['ns_per_packet']:.0f} ns per small packet")


def _payload_checks(topo: Topology) -> list[bool]:
    print("   payload checks (sha256 of what arrived):")
    intact = []
    for proto, family, dnat in (("tcp", 4, False), ("udp", 4, False), ("tcp", 6, False),
                                ("udp", 6, False), ("tcp", 4, True), ("udp", 4, True)):
        rate = 40_000_000 if proto == "tcp" else 4000
        r = topo.transfer(proto=proto, family=family, dnat=dnat, size=2_000_000, rate_pps=rate)
        label = f"{proto}/ipv{family}{' via DNAT :8080' if dnat else ' masqueraded'}"
        intact.append(r["intact"])
        print(f"   {label:26s} {r['received']:>9d} bytes, intact: {r['intact']}")
    return intact
