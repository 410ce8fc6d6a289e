"""What the agent-offload guest modules share (guest_offload_vlan.py and
guest_offload_qinq_pppoe.py, which run INSIDE the 6.1 kernel lane, one boot each, side
by side: split in two so the lane's two boot slots end at about the same time,
docs/kernel-lane.md): the agent in the router namespace, the traffic, the checks of
one case. Not a test module (the guest pytest collects only the module it is given;
the host's never collects guest files). Together the two modules prove that the
agent offloads TCP and UDP, IPv4 and IPv6, end to end over a real 802.1Q VLAN, a
VLAN-filtering bridge, a real QinQ stack and a real PPPoE session (also PPPoE over
VLAN 7); and SQM (cake, ifb) with the TC hook.

For each case the agent (`python -m offloader.cli run -i rl0 -i <WAN logical device>
--hook xdp|tc -v`) runs in the router namespace through `nsenter --net` (so it pins
under /sys/fs/bpf/ebpf-offloader/netns-<inode>, removed afterwards; one agent per
case, except that the QinQ MTU-1500 case hands its running XDP agent on to
test_qinq_offload[xdp] and the SQM case its TC agent to test_vlan_offload[tc],
each run right after, in the same module: an agent start under emulation is 30-60 s), and four
connections from the LAN host run at once (run_flows): TCP and UDP over IPv4 (NATed
by the router's masquerade) and IPv6 (routed, as OpenWrt does), each carrying data
both ways. Small packets go until the agent shows every direction offloaded, then
the bulk follows. Checked (check_flows), before any FIN hands TCP flows back:

- the payload arrives intact (SHA-256 of what was sent and what arrived; UDP
  datagrams are numbered);
- the far host saw the router's address (IPv4) or the LAN host's (IPv6);
- every direction was `offloaded` in the agent's status when the bulk started, and
  its packet counter carried the bulk (senders have TSO/GSO off, so a packet is a
  segment); the datapath counter `redirect` moved by at least as much;
- XDP: the WAN -> LAN keys carry the VLAN id(s) / PPPoE session the datapath parsed
  on the lowest device, the logical WAN device (VLAN or ppp device) was bypassed
  (its tx counter, from the poll that saw every direction offloaded, grew by far
  less than the packets sent after it), and the frames the far host received
  (AF_PACKET on its veth, where XDP-redirected frames surface) carry the right tag
  stack / PPPoE session id and PPP protocol, the router's MAC, the right source;
- TC: the agent attached to the logical devices themselves (rw0.7, rw0.100.7,
  pppoe-wan marked L3) and redirects into them, so their tx counters do grow.

PPPoE mapping: one session per Ethernet device, so the agent maps `pppoe-wan` to its
session through /proc/net/pppoe alone (no ip-up hook file; EBPF_OFFLOADER_RUN_DIR points
at an empty directory so nothing else can answer).

Veth artefacts handled as on the host (docs/design.md, XDP redirect into veth): hosts
that receive XDP-redirected frames have GRO on and tx checksum offload off; senders have
TSO/GSO off. For QinQ the veths get MTU 1504: a veth accepts a frame of at most MTU +
14 + 4 bytes, one tag's worth, while a full-size QinQ frame has two tags in the frame
(real QinQ links carry baby giants).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .topology import (
    BPFFS,
    Sniffer,
    Topology,
    bpffs_session,
    in_netns,
    ip,
    link_mac,
    link_stats,
    read_proc_pppoe,
    require_guest,
    sh,
)

require_guest()  # the guest modules call it first too; this guards a direct import

from offloader import control  # noqa: E402  (after the guard: PYTHONPATH is the repo)
from offloader.errors import OffloadError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent.parent
OBJECT = Path(os.environ.get("KERNEL_LANE_BPF_OBJECT", REPO / "build" / "offload.bpf.o"))
SHARED = Path(os.environ.get("KERNEL_LANE_SHARED") or tempfile.gettempdir())



# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def bpffs():
    """bpffs on /sys/fs/bpf (the guest does not mount it); whatever was pinned during
    the module is removed afterwards, and the mount too if this module made it.
    Each guest module imports it, so that pytest finds it there."""
    if not OBJECT.exists():
        pytest.fail(f"{OBJECT} does not exist: build the object first "
                    "(cmake -S . -B build && cmake --build build)", pytrace=False)
    with bpffs_session() as path:
        yield path



# --------------------------------------------------------------------------- agent


def status(ns: str) -> dict | None:
    """The agent's status, asked in-process over its control socket (an abstract UNIX
    socket, per network namespace): no Python start per poll under TCG."""
    with in_netns(ns):
        try:
            return control.request("status", timeout=5.0)
        except (OSError, OffloadError, ValueError):
            return None


def _nsenter(ns: str) -> list[str]:
    # not `ip netns exec`: that remounts /sys and hides /sys/fs/bpf
    return ["nsenter", f"--net=/run/netns/{ns}"]


_CLI_CHECKED: list[str] = []  # the router namespace where the CLI's status was run


class Agent:
    def __init__(self, topo: Topology, hook: str, log: Path, run_dir: str) -> None:
        self.topo, self.hook, self.log = topo, hook, log
        self.ns = topo.router_ns
        self.pin_dir = BPFFS / "ebpf-offloader" / f"netns-{os.stat(f'/run/netns/{self.ns}').st_ino}"
        argv = [*_nsenter(self.ns), sys.executable, "-m", "offloader.cli", "run",
                "-i", topo.router_lan_if, "-i", topo.router_wan_if, "--hook", hook,
                "--object", str(OBJECT), "-v"]
        env = dict(os.environ, EBPF_OFFLOADER_RUN_DIR=run_dir)
        self.logf = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(argv, stdout=self.logf, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        self.run_dir = run_dir
        self.t0 = time.monotonic()
        self.ready_s: float | None = None

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 240.0) -> dict:
        """Until the agent answers on its control socket; bounded. The first time
        in the module also `ebpf-offloader status --json` (run like the agent:
        nsenter, same Python), as a user runs it; later cases ask in-process (a
        Python start costs seconds under TCG)."""
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.2) + 1):
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.tail()}")
            if status(self.ns) is not None:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"agent did not answer within {timeout}s:\n{self.tail()}")
            time.sleep(0.2)
        self.ready_s = round(time.monotonic() - self.t0, 1)
        if _CLI_CHECKED:
            st = status(self.ns)
            assert st and st["running"] is True, (st, self.tail())
            return st
        _CLI_CHECKED.append(self.ns)
        for _ in range(5):  # the CLI, exactly as a user runs it
            cp = sh([*_nsenter(self.ns), sys.executable, "-m", "offloader.cli", "status",
                     "--json"], check=False, timeout=60)
            if cp.returncode == 0:
                st = json.loads(cp.stdout)
                assert st["running"] is True
                return st
            time.sleep(0.5)
        raise AssertionError(f"`status --json` did not answer: {cp.stderr}\n{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.logf.close()
        subprocess.run(["rm", "-rf", str(self.pin_dir)], check=False, timeout=30)
        with contextlib.suppress(OSError):
            (BPFFS / "ebpf-offloader").rmdir()  # only when empty
        with contextlib.suppress(OSError):
            os.rmdir(self.run_dir)


@contextlib.contextmanager
def running_agent(topo: Topology, hook: str, name: str, given: Agent | None = None,
                  hand_on: dict | None = None) -> Iterator[Agent]:
    """An agent on `topo` for the block: a new one, or `given` (one a case before
    handed on). Stopped at the end, unless the block ended cleanly and `hand_on` is
    given: then it stays running, in hand_on["agent"], for the next case on the same
    topology and hook (whoever takes it stops it; the fixture holding hand_on stops
    it if nobody does)."""
    if given is not None:
        assert (given.topo, given.hook) == (topo, hook), (given.topo, given.hook)
        agent = given
    else:
        run_dir = tempfile.mkdtemp(prefix="kl-ofl-run-")  # stays empty: /proc/net/pppoe only
        agent = Agent(topo, hook, SHARED / f"agent-{name}.log", run_dir)
    handed = False
    try:
        yield agent
        assert agent.proc.poll() is None, f"agent died:\n{agent.tail()}"
        if hand_on is not None:
            hand_on["agent"], handed = agent, True
    finally:
        if not handed:
            agent.stop()


# --------------------------------------------------------------------------- traffic


def _ethtool(ns: str, dev: str, *features: str) -> None:
    sh(["ip", "netns", "exec", ns, "ethtool", "-K", dev, *features], check=False)


_PREPARED: set[str] = set()  # router namespaces whose hosts prepare_hosts() set up


def prepare_hosts(topo: Topology, hook: str) -> None:
    """Senders: TSO/GSO off (a counted packet is a segment), tx checksum offload off
    (XDP redirect does not complete CHECKSUM_PARTIAL); receivers of XDP-redirected
    frames over veth: GRO on. Once per topology (the same for both hooks)."""
    if topo.router_ns in _PREPARED:
        return
    _PREPARED.add(topo.router_ns)
    lan_devs = ["lan0"]
    far_devs = ["w0"] + ([topo.wan_if] if topo.wan_if != "w0" and topo.kind != "pppoe" else [])
    if topo.kind == "pppoe" and topo.pppoe.get("isp_eth", "w0") != "w0":
        far_devs.append(topo.pppoe["isp_eth"])
    for ns, devs in ((topo.lan_ns, lan_devs), (topo.wan_ns, far_devs)):
        for dev in devs:
            _ethtool(ns, dev, "tso", "off", "gso", "off", "tx", "off")
        _ethtool(ns, devs[0], "gro", "on")
    if topo.tags:
        # The far host's VLAN devices write their tags into the frame, as a wire
        # delivers them. With the veth's default tx VLAN offload the (outer) tag
        # travels in skb metadata instead, and 6.1's veth runs XDP on the frame
        # without it: the program sees an untagged frame (observed here; the key
        # then had no VLAN and the flow was resolved as if it entered rw0 itself).
        _ethtool(topo.wan_ns, "w0", "tx-vlan-hw-insert", "off",
                 "tx-vlan-stag-hw-insert", "off")
    if topo.kind == "pppoe":
        # The ISP's ppp device queues 3 packets (ppp's default txqueuelen): under
        # emulation its UDP bursts overflowed that queue before the wire. An
        # access concentrator queues more; the router's pppoe-wan keeps 3.
        ip(topo.wan_ns, "link", "set", topo.wan_if, "txqueuelen", "1000")
    if topo.kind == "qinq":
        # both tags in the frame: 1500 + 14 + 8 bytes, more than a veth forwards
        # at MTU 1500 (MTU + 14 + 4); the VLAN devices keep MTU 1500
        ip(topo.wan_ns, "link", "set", "w0", "mtu", "1504")
        ip(topo.router_ns, "link", "set", "rw0", "mtu", "1504")


def _send_paced(conn: socket.socket, data: bytes, rate: float, deadline: float) -> None:
    chunk = 16384
    t0 = time.monotonic()
    for off in range(0, len(data), chunk):
        if time.monotonic() > deadline:
            raise TimeoutError(f"deadline passed after {off} bytes sent")
        conn.sendall(data[off:off + chunk])
        ahead = (off + chunk) / rate - (time.monotonic() - t0)
        if ahead > 0:
            time.sleep(ahead)


# --------------------------------------------------------------------------- flows

DUPLEX_BYTES = int(os.environ.get("KERNEL_LANE_OFFLOAD_BYTES", "600000"))  # each way
DUPLEX_RATE = float(os.environ.get("KERNEL_LANE_OFFLOAD_RATE", "600000"))  # bytes/s each way
UDP_SIZE = 1200  # datagram payload: fits every path here (IPv6 over PPPoE: 1492 - 48)
WARMUP_GAP = 0.05  # seconds between the small packets sent until the flow is offloaded
WARMUP_CHUNK = 1200  # bytes per warm-up send (TCP)
_SEQ = 4  # bytes of sequence number in front of each UDP datagram's data
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # root: past net.core.rmem_max

# UDP over PPPoE: (bytes, bytes/s) each way. The ISP namespace's PPPoE stack under
# emulation loses datagrams with the agent not running (measured without it: 17-85 %
# of two 600 KB/s streams each way, 0-2 % at 60 KB/s); so PPPoE UDP runs slower, and
# at least PPPOE_UDP_ARRIVED of each leg's datagrams must arrive, all intact.
PPPOE_UDP = (60000, 60000.0)
PPPOE_UDP_ARRIVED = 0.5

# (family, proto) of the flows every case runs, all at once
FLOWS = ((4, "tcp"), (6, "tcp"), (4, "udp"), (6, "udp"))


def _norm(addr: str) -> str:
    return str(ipaddress.ip_address(addr))


def _endpoints(topo: Topology, family: int) -> tuple[str, str, str]:
    """(LAN host, far host, the source the far host must see) for one family:
    IPv4 is NATed to the router's WAN address, IPv6 is routed unless nat6."""
    if family == 4:
        return topo.lan_addr, topo.wan_addr, topo.router_wan_addr
    assert topo.lan_addr6 and topo.wan_addr6, f"{topo.kind} topology has no IPv6"
    seen = topo.router_wan_addr6 if topo.nat6 else topo.lan_addr6
    return topo.lan_addr6, topo.wan_addr6, seen or ""


def _mss_of(topo: Topology, family: int) -> int:
    # TCP with timestamps over the path MTU (PPPoE: 1492)
    return (1492 if topo.kind == "pppoe" else 1500) - (52 if family == 4 else 72)


def _find(st: dict | None, proto: str, src: str, sport: int, dst: str) -> dict | None:
    for f in (st or {}).get("flows", []):
        if (f["proto"] == proto and f["sport"] == sport and _norm(f["src"]) == src
                and _norm(f["dst"]) == dst):
            return f
    return None


class _Leg:
    """One direction of a duplex flow: the sender streams `data` (TCP) or numbered
    datagrams (UDP), slowly until `go` is set, then paced at `rate`; the receiver
    checks what arrived."""

    def __init__(self, name: str, proto: str, nbytes: int) -> None:
        self.name, self.proto = name, proto
        self.data = os.urandom(nbytes)
        step = UDP_SIZE - _SEQ
        self.chunks = [self.data[i:i + step] for i in range(0, nbytes, step)]
        self.sent_before_go = 0  # bytes (TCP) / datagrams (UDP) sent during the warm-up
        self.sent_done = threading.Event()
        self.got: bytes | None = None
        self.received: dict[int, bytes] = {}  # UDP: datagram data by sequence number
        self.missing: int | None = None
        self.error: str | None = None

    @property
    def expect(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def send(self, sock: socket.socket, go: threading.Event, rate: float,
             deadline: float) -> None:
        try:
            if self.proto == "tcp":
                self._send_stream(sock, go, rate, deadline)
            else:
                self._send_datagrams(sock, go, rate, deadline)
        except Exception as e:  # reported by the caller
            self.error = f"send: {type(e).__name__}: {e}"
        finally:
            self.sent_done.set()

    def _send_stream(self, sock, go, rate, deadline) -> None:
        off = 0
        for _ in range(400):  # warm-up: bounded (400 x 50 ms)
            if go.is_set() or off >= len(self.data):
                break
            sock.sendall(self.data[off:off + WARMUP_CHUNK])
            off += WARMUP_CHUNK
            time.sleep(WARMUP_GAP)
        self.sent_before_go = off
        _send_paced(sock, self.data[off:], rate, deadline)

    def _send_datagrams(self, sock, go, rate, deadline) -> None:
        n = 0
        for _ in range(400):
            if go.is_set() or n >= len(self.chunks):
                break
            sock.send(n.to_bytes(_SEQ, "big") + self.chunks[n])
            n += 1
            time.sleep(WARMUP_GAP)
        self.sent_before_go = n
        t0 = time.monotonic()
        for i in range(n, len(self.chunks)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"deadline passed after {i} datagrams")
            sock.send(i.to_bytes(_SEQ, "big") + self.chunks[i])
            ahead = (i - n + 1) * UDP_SIZE / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)

    def receive(self, sock: socket.socket, deadline: float) -> None:
        try:
            if self.proto == "tcp":
                self._recv_stream(sock, deadline)
            else:
                self._recv_datagrams(sock, deadline)
        except Exception as e:
            self.error = f"receive: {type(e).__name__}: {e}"

    def _recv_stream(self, sock, deadline) -> None:
        buf = bytearray()
        for _ in range(1_000_000):
            if len(buf) >= len(self.data) or time.monotonic() > deadline:
                break
            b = sock.recv(65536)
            if not b:
                break
            buf += b
        self.got = bytes(buf)

    def _recv_datagrams(self, sock, deadline) -> None:
        have: dict[int, bytes] = {}
        sock.settimeout(0.5)
        done_at = None
        for _ in range(1_000_000):
            if len(have) == len(self.chunks) or time.monotonic() > deadline:
                break
            if self.sent_done.is_set():  # stragglers: at most 3 s after the sender
                done_at = done_at or time.monotonic()
                if time.monotonic() - done_at > 3.0:
                    break
            try:
                d = sock.recv(65536)
            except TimeoutError:
                continue
            if len(d) > _SEQ:  # handshake datagrams are shorter than a sequence number
                have[int.from_bytes(d[:_SEQ], "big")] = d[_SEQ:]
        self.received = have
        self.missing = len(self.chunks) - len(have)
        self.got = b"".join(have.get(i, b"") for i in range(len(self.chunks)))

    def packets_after_go(self, mss: int) -> int:
        """Data packets sent once the flow was offloaded (TCP: at least this many
        segments of at most `mss`)."""
        if self.proto == "udp":
            return len(self.chunks) - self.sent_before_go
        return (len(self.data) - self.sent_before_go) // mss


def _connect_pair(topo: Topology, family: int, proto: str, port: int,
                  timeout: float) -> tuple[socket.socket, socket.socket, tuple]:
    """Client (LAN host) and server-side (far host) sockets of one connection; for
    UDP both have exchanged a datagram, so conntrack saw both directions. Returns
    (client, server side, the client's address as the server saw it)."""
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    typ = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    _, far, _ = _endpoints(topo, family)
    with in_netns(topo.wan_ns):
        srv = socket.socket(af, typ)
    with in_netns(topo.lan_ns):
        cli = socket.socket(af, typ)
    try:
        for s_ in (srv, cli):
            # a Python receiver under TCG stalls for tenths of a second: room for it
            s_.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((far, port))
        srv.settimeout(timeout)
        cli.settimeout(timeout)
        if proto == "tcp":
            srv.listen(1)
            cli.connect((far, port))
            conn, peer = srv.accept()
            srv.close()
            conn.settimeout(timeout)
            return cli, conn, peer
        cli.connect((far, port))
        srv.settimeout(0.2)
        for _ in range(50):  # bounded: 50 x 0.2 s
            cli.send(b"hi")  # shorter than a sequence number: not data
            try:
                _, peer = srv.recvfrom(65536)
                break
            except TimeoutError:
                continue
        else:
            raise AssertionError(f"UDP to [{far}]:{port} never arrived")
        srv.connect(peer)
        cli.settimeout(0.2)
        for _ in range(50):
            srv.send(b"ho")
            try:
                cli.recv(65536)
                break
            except TimeoutError:
                continue
        else:
            raise AssertionError(f"UDP reply from [{far}]:{port} never arrived")
        srv.settimeout(timeout)
        cli.settimeout(timeout)
        return cli, srv, peer
    except BaseException:
        cli.close()
        srv.close()
        raise


def _udp_counters(ns: str, family: int) -> dict[str, int]:
    """UDP counters of a namespace (/proc/net/snmp or snmp6), read in-process."""
    out: dict[str, int] = {}
    with in_netns(ns):
        if family == 4:
            with open("/proc/thread-self/net/snmp") as f:
                rows = [line.split() for line in f if line.startswith("Udp:")]
            if len(rows) == 2:
                out = {k: int(v) for k, v in zip(rows[0][1:], rows[1][1:], strict=True)}
        else:
            with open("/proc/thread-self/net/snmp6") as f:
                out = {k[4:]: int(v) for k, v in (line.split() for line in f)
                       if k.startswith("Udp6")}
    return {k: out[k] for k in ("InDatagrams", "RcvbufErrors", "InErrors", "InCsumErrors")
            if k in out}


@dataclasses.dataclass
class Flow:
    """One connection of run_flows(): its two legs and what the agent showed."""

    family: int
    proto: str
    port: int
    up: _Leg
    down: _Leg
    peer: str = ""  # the client's address as the far host saw it
    rate: float = DUPLEX_RATE  # bytes/s per direction once offloaded
    keys: dict = dataclasses.field(default_factory=dict)  # leg name -> _find() key
    at_go: dict = dataclasses.field(default_factory=dict)  # leg name -> status row
    at_end: dict = dataclasses.field(default_factory=dict)
    sockets: tuple = ()  # (client, far side)

    @property
    def name(self) -> str:
        return f"IPv{self.family} {self.proto.upper()}"

    @property
    def legs(self) -> dict[str, _Leg]:
        return {"up": self.up, "down": self.down}


def _qdisc_drops(ns: str, dev: str) -> int:
    out = sh(["tc", "-n", ns, "-s", "-j", "qdisc", "show", "dev", dev], check=False).stdout
    return sum(q.get("drops", 0) for q in json.loads(out or "[]"))


def softnet_dropped() -> int:
    """Packets the kernel dropped because a CPU's input backlog was full
    (/proc/net/softnet_stat, second column, summed over CPUs; not per namespace)."""
    with open("/proc/net/softnet_stat") as f:
        return sum(int(line.split()[1], 16) for line in f if line.strip())


def run_flows(topo: Topology, agent: Agent | None, specs: list[tuple[int, str, int]],
              nbytes: int = DUPLEX_BYTES, rate: float = DUPLEX_RATE,
              udp: tuple[int, float] | None = None, sniff_wire: bool = True,
              down_bytes: int | None = None, timeout: float = 90.0) -> dict:
    """Connections from the LAN host to the far host, one per (family, proto,
    port) of `specs`, all at once, each carrying `nbytes` both ways at the same
    time (UDP: `udp` = (bytes, rate) when given; `down_bytes`: the far host
    sends that much instead). Small packets go each way until
    the agent's status shows every direction of every connection `offloaded`
    (no wait without an agent); then the bulk follows, paced at `rate` per
    direction. Returns the flows (legs, the status rows when the bulk
    started and once it had arrived, before any FIN), the datapath counters, the
    logical WAN device's tx count and, for XDP, the frames the far host got."""
    ns = topo.router_ns
    deadline = time.monotonic() + timeout
    flows: list[Flow] = []
    socks: list[socket.socket] = []
    go = threading.Event()
    xdp = agent is not None and agent.hook == "xdp"
    sniff = Sniffer(topo.wan_ns, "w0") if xdp and sniff_wire else None
    out: dict = {"flows": flows}
    try:
        for family, proto, port in specs:
            lan, far, _ = _endpoints(topo, family)
            cli, srv, peer = _connect_pair(topo, family, proto, port, 20.0)
            socks += [cli, srv]
            size, f_rate = udp if (udp and proto == "udp") else (nbytes, rate)
            down = size if down_bytes is None else down_bytes
            f = Flow(family, proto, port, _Leg("up", proto, size), _Leg("down", proto, down),
                     peer=_norm(peer[0]), rate=f_rate)
            f.keys = {"up": (proto, _norm(lan), cli.getsockname()[1], _norm(far)),
                      "down": (proto, _norm(far), port, f.peer)}
            f.sockets = (cli, srv)
            flows.append(f)
        st0 = (status(ns) if agent is not None else None) or {}
        drop0 = softnet_dropped()
        pppoe = topo.kind == "pppoe"
        isp0 = (link_stats(topo.wan_ns, "w0"), link_stats(topo.wan_ns, topo.wan_if),
                _qdisc_drops(topo.wan_ns, topo.wan_if)) if pppoe else None
        udp0 = {(n, fam): _udp_counters(n, fam) for n in (topo.lan_ns, topo.wan_ns)
                for fam in {f.family for f in flows}}
        threads = []
        for f in flows:
            cli, srv = f.sockets
            for fn, args in ((f.up.send, (cli, go, f.rate, deadline)),
                             (f.up.receive, (srv, deadline)),
                             (f.down.send, (srv, go, f.rate, deadline)),
                             (f.down.receive, (cli, deadline))):
                threads.append(threading.Thread(target=fn, args=args, daemon=True))
        t0 = time.monotonic()
        for th in threads:
            th.start()
        for _ in range(300 if agent is not None else 0):  # bounded: 300 x (0.05 s + a call)
            st = status(ns)
            for f in flows:
                f.at_go = {k: _find(st, *key) for k, key in f.keys.items()}
            if all(r and r["state"] == "offloaded" for f in flows for r in f.at_go.values()):
                break
            if time.monotonic() - t0 > 20 or any(g.error for f in flows for g in f.legs.values()):
                break
            time.sleep(0.05)
        out["offloaded_after_s"] = round(time.monotonic() - t0, 2)
        # the logical WAN device's tx counts from here: once every direction is
        # offloaded, XDP bypasses it (the warm-up before went through the kernel)
        wan0 = link_stats(ns, topo.router_wan_if)
        go.set()
        for th in threads:
            th.join(timeout=max(1.0, deadline - time.monotonic()))
        # every leg arrived, no FIN yet: the flows are still there
        st1 = (status(ns) if agent is not None else None) or {}
        out["softnet_dropped"] = softnet_dropped() - drop0
        if isp0 is not None:  # where the ISP's PPPoE stack loses datagrams
            w, p = link_stats(topo.wan_ns, "w0"), link_stats(topo.wan_ns, topo.wan_if)
            out["isp"] = {"w0_rx": w["rx_packets"] - isp0[0]["rx_packets"],
                          "ppp_rx": p["rx_packets"] - isp0[1]["rx_packets"],
                          "ppp_tx": p["tx_packets"] - isp0[1]["tx_packets"],
                          "w0_tx": w["tx_packets"] - isp0[0]["tx_packets"],
                          "ppp_qdisc_drops": _qdisc_drops(topo.wan_ns, topo.wan_if) - isp0[2]}
        for f in flows:
            f.at_end = {k: _find(st1, *key) for k, key in f.keys.items()}
        out["seconds"] = round(time.monotonic() - t0, 2)
        out["redirect"] = (st1.get("datapath", {}).get("redirect", 0)
                           - st0.get("datapath", {}).get("redirect", 0))
        out["datapath"] = st1.get("datapath", {})
        out["wan_dev_tx"] = link_stats(ns, topo.router_wan_if)["tx_packets"] - wan0["tx_packets"]
        out["udp_counters"] = {  # the end hosts' own view: receive errors, drops
            f"{n} v{fam}": {k: v - c0.get(k, 0) for k, v in _udp_counters(n, fam).items()}
            for (n, fam), c0 in udp0.items()}
    finally:
        for s_ in socks:
            s_.close()
        out["frames"] = sniff.frames() if sniff is not None else []
        if sniff is not None:
            sniff.close()
    return out


def _flows_context(got: dict, agent: Agent) -> str:
    rows = {f.name: {"port": f.port, "peer": f.peer, "at_go": f.at_go, "at_end": f.at_end,
                     "legs": {n: {"error": g.error, "missing": g.missing,
                                  "sent_before_go": g.sent_before_go,
                                  "got": None if g.got is None else len(g.got)}
                              for n, g in f.legs.items()}}
            for f in got["flows"]}
    rest = {k: v for k, v in got.items() if k not in ("frames", "flows")}
    return (f"\n{json.dumps(rest, default=str)}\n{json.dumps(rows, default=str)}"
            f"\n--- agent log ---\n{agent.tail()}")


def check_flows(topo: Topology, agent: Agent, port: int, flows=FLOWS) -> dict:
    """Each (family, proto) of `flows` that the topology has addresses for, all at
    once (run_flows) on ports port, port+1, ...: payload intact both ways, the
    far host saw the right source (NAT for IPv4, the LAN host for routed IPv6),
    every direction offloaded before the bulk and its counter carried the bulk;
    XDP: keys as parsed on the lowest device, the logical WAN device bypassed,
    the frames on the wire; TC: redirected into the logical WAN device."""
    specs = [(fam, proto, port + i) for i, (fam, proto) in enumerate(flows)
             if fam == 4 or topo.wan_addr6]
    got = run_flows(topo, agent, specs, udp=PPPOE_UDP if topo.kind == "pppoe" else None)
    ctx = _flows_context(got, agent)
    up_want = down_want = 0
    lost = {}
    for f in got["flows"]:
        what = f"{topo.kind} {agent.hook} {f.name}"
        for leg in f.legs.values():
            assert leg.error is None, f"{what} {leg.name}: {leg.error}{ctx}"
            if topo.kind == "pppoe" and f.proto == "udp" and leg.missing:
                # The emulated kernel's PPPoE path in the ISP namespace loses
                # datagrams under TCG with the agent not running at all
                # (docs/kernel-lane.md): bounded, and what arrived must be intact.
                bad = [i for i, d in leg.received.items() if d != leg.chunks[i]]
                assert not bad, f"{what} {leg.name}: datagrams {bad[:10]} corrupted{ctx}"
                assert len(leg.received) >= PPPOE_UDP_ARRIVED * len(leg.chunks), \
                    f"{what} {leg.name}: only {len(leg.received)} of {len(leg.chunks)} " \
                    f"datagrams arrived{ctx}"
                lost[f"{f.name} {leg.name}"] = leg.missing
                continue
            n_got = -1 if leg.got is None else len(leg.got)
            assert n_got == len(leg.data), \
                f"{what} {leg.name}: {n_got} of {len(leg.data)} bytes (missing datagrams: " \
                f"{leg.missing}){ctx}"
            intact = hashlib.sha256(leg.got or b"").hexdigest() == leg.expect
            assert intact, f"{what} {leg.name}: payload corrupted{ctx}"
        seen_src = _norm(_endpoints(topo, f.family)[2])
        assert f.peer == seen_src, f"{what}: the far host saw {f.peer}, not {seen_src}{ctx}"
        mss = _mss_of(topo, f.family)
        carried, wants = {}, {}
        for name, leg in f.legs.items():
            first, last = f.at_go.get(name), f.at_end.get(name)
            assert first and first["state"] == "offloaded", \
                f"{what} {name}: not offloaded after {got['offloaded_after_s']}s{ctx}"
            assert last and last["state"] == "offloaded", f"{what} {name}: handed back{ctx}"
            carried[name] = last["packets"] - first["packets"]
            want = leg.packets_after_go(mss)
            if name == "down" and f"{f.name} {name}" in lost:
                # lost in the ISP before the wire: the router saw what arrived
                want = min(want, sum(1 for i in leg.received if i >= leg.sent_before_go))
            wants[name] = want
            assert carried[name] >= 0.9 * want, \
                f"{what} {name}: the offloaded flow carried {carried[name]} of >= {want} " \
                f"data packets{ctx}"
        up_want += wants["up"]
        down_want += wants["down"]
        up_row, down_row = f.at_end["up"], f.at_end["down"]
        if agent.hook == "xdp":
            assert up_row["in_dev"] == topo.router_lan_if, (what, up_row)
            assert down_row["in_dev"] == topo.router_wan_lowest, (what, down_row)
            assert down_row["vlan"] == [v for _, v in topo.tags], (what, down_row)
            if topo.kind == "pppoe":
                sid = read_proc_pppoe(topo.router_ns)[0].session_id
                assert down_row["pppoe_sid"] == sid, (what, down_row, sid)
            _check_frames(topo, got, f.family, f.proto, ctx)
        else:
            assert (up_row["in_dev"], down_row["in_dev"]) == (
                topo.router_lan_if, topo.router_wan_if), (what, up_row, down_row)
        print(f"{what}: {DUPLEX_BYTES} B each way intact, offloaded flows carried up "
              f"{carried['up']} / down {carried['down']} packets (>= "
              f"{f.up.packets_after_go(mss)} / {f.down.packets_after_go(mss)} sent after the "
              f"warm-up of {f.up.sent_before_go} / {f.down.sent_before_go})")
    assert got["redirect"] >= 0.9 * (up_want + down_want), \
        f"redirect moved by {got['redirect']}{ctx}"
    assert got["datapath"].get("pass_stale", 0) == 0, f"fail-safe engaged{ctx}"
    if agent.hook == "xdp":
        # the logical WAN device (VLAN or ppp device) was bypassed: counted from
        # the poll that saw every direction offloaded (the warm-up before it went
        # through the kernel), it carried next to none of the bulk that followed
        bound = 0.3 * up_want
        assert got["wan_dev_tx"] <= bound, (got["wan_dev_tx"], bound, ctx)
    else:
        # redirected into the logical WAN device, whose transmit path encapsulates
        assert got["wan_dev_tx"] >= 0.9 * up_want, (got["wan_dev_tx"], up_want, ctx)
    print(f"{topo.kind} {agent.hook}: {len(got['flows'])} flows at once in {got['seconds']}s, "
          f"all offloaded after {got['offloaded_after_s']}s, redirect +{got['redirect']} "
          f"(>= {up_want + down_want} data packets), {topo.router_wan_if} tx "
          f"+{got['wan_dev_tx']}, {len(got['frames'])} frames sniffed, "
          f"UDP counters {got['udp_counters']}, datagrams lost on the PPPoE path {lost}, "
          f"ISP {got.get('isp')}, softnet drops {got['softnet_dropped']}")
    return got


def _check_frames(topo: Topology, got: dict, family: int, proto: str, ctx: str) -> None:
    """The frames of the flow the far host received from the router (XDP writes
    them on rw0; they surface at the peer veth): tag stack, MACs, the source the
    far host must see, PPPoE session and PPP protocol."""
    ipproto = 6 if proto == "tcp" else 17
    _, far, seen_src = _endpoints(topo, family)
    tags = [{"802.1Q": 0x8100, "802.1ad": 0x88A8}[p] for p, _ in topo.tags]
    want_tags = tuple(zip(tags, [v for _, v in topo.tags], strict=True))
    inbound = [f for f in got["frames"] if not f.outgoing and f.ip_proto == ipproto
               and f.ip_dst and _norm(f.ip_dst) == _norm(far)]
    assert len(inbound) >= 10, (len(got["frames"]), ctx)
    rmac = link_mac(topo.router_ns, "rw0")
    ppp = 0x0021 if family == 4 else 0x0057
    sid = read_proc_pppoe(topo.router_ns)[0].session_id if topo.kind == "pppoe" else None
    for f in inbound:
        assert f.tags == want_tags, (f, want_tags)
        assert f.src == rmac, (f, rmac)
        assert _norm(f.ip_src or "::") == _norm(seen_src), (f, seen_src)
        if topo.kind == "pppoe":
            assert (f.ethertype, f.ppp_proto, f.pppoe_session) == (0x8864, ppp, sid), f
            assert f.dst == topo.pppoe["isp_mac"], f
        else:
            assert f.ethertype == (0x0800 if family == 4 else 0x86DD), f


# --------------------------------------------------------------------------- tests


def _case(topo: Topology, hook: str, name: str, port: int, flows=FLOWS,
          given: Agent | None = None) -> None:
    """One agent on the topology (a new one, or `given`, handed on by the case
    before and still running), then each of `flows` (check_flows); the agent is
    stopped at the end."""
    prepare_hosts(topo, hook)
    with running_agent(topo, hook, name, given=given) as agent:
        st = agent.wait_ready()
        hooks = {i["name"]: i["hook"] for i in st["interfaces"]}
        if hook == "xdp":
            want = {topo.router_lan_if, topo.router_wan_lowest}
        else:
            want = {topo.router_lan_if, topo.router_wan_if}
        assert set(hooks) == want, (hooks, agent.tail())
        assert all(h.startswith(hook) for h in hooks.values()), hooks
        print(f"{name}: agent answered after {agent.ready_s}s"
              f"{' (handed on, started for a case before)' if given else ''}, attached {hooks}")
        if hook == "xdp" and topo.kind in ("vlan", "qinq"):
            # VLAN devices sit on rw0: the agent turns receive tag stripping
            # off there while XDP runs (a NIC that strips would hide the tag).
            assert _rx_vlan_offload(topo.router_ns, topo.router_wan_lowest) == "off"
        check_flows(topo, agent, port, flows)
    if hook == "xdp" and topo.kind in ("vlan", "qinq"):
        assert _rx_vlan_offload(topo.router_ns, topo.router_wan_lowest) == "on"  # restored


def _rx_vlan_offload(ns: str, dev: str) -> str:
    out = sh(["ip", "netns", "exec", ns, "ethtool", "-k", dev]).stdout
    line = next(x for x in out.splitlines() if x.startswith("rx-vlan-offload:"))
    return line.split()[1]
