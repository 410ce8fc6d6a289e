"""Namespace topologies for the second-kernel lane (802.1Q, QinQ, PPPoE).

These run inside the 6.1 guest (this machine's 6.18 has no VLAN and no PPP), as root.
Each builder is a context manager that creates its own network namespaces, yields a
`Topology` describing names and addresses, and removes every namespace, link and
process it created on exit, also when the body raises.

Shape (all builders):

    LAN host ---- router ----[WAN encapsulation]---- WAN/ISP host
    <p>-lan        <p>-rtr                            <p>-wan / <p>-isp

    LAN:  lan0 (LAN host) <-> rl0 (router)   198.18.1.0/24, 2001:db8:1::/64
    WAN:  rw0 (router) <-> w0 (WAN host), a veth carrying
          - vlan:  rw0.<vid> / w0.<vid>                          198.18.2.0/24, 2001:db8:2::/64
          - qinq:  rw0.<svid> (802.1ad) . <cvid> (802.1Q) alike  198.18.3.0/24, 2001:db8:3::/64
          - pppoe: PPPoE session on rw0 (or rw0.<vid>); pppd in the router names the
                   PPP device `pppoe-wan`; pppoe-server in the ISP namespace.
                   ISP 198.18.200.1, router 198.18.200.10 (IPv4 only)

The router forwards with plain kernel forwarding (sysctls set inside its namespace
only). With nat=True it masquerades on its WAN device (nftables, in its namespace);
without NAT the far host gets a route back to the LAN prefix.

Addresses: only 198.18.0.0/15 and 2001:db8::/32. Every wait is bounded in count and
time. Later, the agent (`ebpf-offloader run -i ...` in `topo.router_ns`) is plugged into
these same topologies; `Topology.router_wan_lowest` is the device it should attach to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.nsutil import in_netns  # noqa: F401 (the guests and the lane bench take it from here)

HERE = Path(__file__).resolve().parent

LAN_NET4 = "198.18.1"
LAN_NET6 = "2001:db8:1"
PPPOE_ISP_ADDR = "198.18.200.1"
PPPOE_CPE_ADDR = "198.18.200.10"
PPP_IFNAME = "pppoe-wan"


class TopologyError(RuntimeError):
    pass


# --------------------------------------------------------------------------- commands


def sh(
    args: Sequence[str],
    ns: str | None = None,
    *,
    check: bool = True,
    timeout: float = 30.0,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command (in namespace `ns` through `ip netns exec`), bounded by `timeout`."""
    cmd = list(args)
    if ns is not None:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    try:
        cp = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, input=input, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise TopologyError(f"timed out after {timeout}s: {' '.join(cmd)}") from e
    if check and cp.returncode != 0:
        raise TopologyError(
            f"failed ({cp.returncode}): {' '.join(cmd)}\nstdout: {cp.stdout}\nstderr: {cp.stderr}"
        )
    return cp


def ip(ns: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`ip [-n ns] args...` (no mount-namespace games, faster than ip netns exec)."""
    base = ["ip"] + (["-n", ns] if ns else [])
    return sh([*base, *args], check=check)


def ipb(ns: str | None, lines: Sequence[str]) -> None:
    """Several `ip` commands in one process (`ip [-n ns] -batch -`): under software
    emulation every process spawn costs 0.1-0.3 s, so builders batch their commands.
    Stops at the first failing line and raises with ip's message."""
    base = ["ip"] + (["-n", ns] if ns else [])
    sh([*base, "-batch", "-"], input="\n".join(lines) + "\n")


def ip_json(ns: str | None, *args: str) -> list[dict]:
    out = ip(ns, "-j", *args).stdout.strip()
    return json.loads(out) if out else []


def modprobe(*mods: str) -> None:
    for m in mods:
        sh(["modprobe", m])


def sysctl(ns: str, key: str, value: str) -> None:
    """Set a per-namespace sysctl inside `ns` only (never the host's)."""
    with in_netns(ns), open("/proc/sys/" + key.replace(".", "/"), "w") as f:
        f.write(value)


def wait_for(what: str, pred, timeout: float = 30.0, interval: float = 0.2):
    """Poll `pred()` until it returns something truthy; bounded in time and count."""
    deadline = time.monotonic() + timeout
    last = None
    for _ in range(int(timeout / interval) + 2):
        last = pred()
        if last:
            return last
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise TopologyError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


# --------------------------------------------------------------------------- namespaces


def _ns_inode(ns: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{ns}").st_ino
    except OSError:
        return None


def netns_pids(ns: str) -> list[int]:
    """PIDs of processes whose network namespace is `ns`."""
    ino = _ns_inode(ns)
    if ino is None:
        return []
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            if os.stat(f"/proc/{d}/ns/net").st_ino == ino:
                pids.append(int(d))
        except OSError:
            continue
    return pids


def kill_netns_processes(ns: str, grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL, every process living in namespace `ns` (by pid)."""
    pids = netns_pids(ns)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            pids = [p for p in pids if os.path.exists(f"/proc/{p}")]
            if not pids:
                return
            time.sleep(0.1)


class Namespaces:
    """Creates namespaces and removes them (and the processes inside) on close."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def add(self, *names: str) -> list[str]:
        for name in names:
            ip(None, "netns", "add", name)
            self.names.append(name)
        return list(names)

    def close(self) -> list[str]:
        errors = []
        for ns in reversed(self.names):
            try:
                kill_netns_processes(ns)
                ip(None, "netns", "del", ns)  # veths die with their namespace
            except Exception as e:  # keep removing the rest
                errors.append(f"{ns}: {e}")
        self.names.clear()
        return errors


def veth(ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
    """A veth pair between two namespaces (created in ns_a, peer moved to ns_b)."""
    ip(ns_a, "link", "add", name_a, "type", "veth", "peer", "name", name_b, "netns", ns_b)
    ip(ns_a, "link", "set", name_a, "up")
    ip(ns_b, "link", "set", name_b, "up")


def addr(ns: str, dev: str, cidr: str) -> None:
    extra = ["nodad"] if ":" in cidr else []
    ip(ns, "addr", "add", cidr, "dev", dev, *extra)


def link_mac(ns: str, dev: str) -> str:
    return ip_json(ns, "link", "show", "dev", dev)[0]["address"]


def link_stats(ns: str, dev: str) -> dict:
    """{'rx_bytes', 'rx_packets', 'tx_bytes', 'tx_packets'} of a device."""
    s = ip_json(ns, "-s", "link", "show", "dev", dev)[0]["stats64"]
    return {
        "rx_bytes": s["rx"]["bytes"],
        "rx_packets": s["rx"]["packets"],
        "tx_bytes": s["tx"]["bytes"],
        "tx_packets": s["tx"]["packets"],
    }


def vlan(ns: str, lower: str, vid: int, proto: str = "802.1Q", name: str | None = None) -> str:
    name = name or f"{lower}.{vid}"
    ip(ns, "link", "add", "link", lower, "name", name, "type", "vlan", "protocol", proto,
       "id", str(vid))
    ip(ns, "link", "set", name, "up")
    return name


def enable_forwarding(ns: str) -> None:
    sysctl(ns, "net.ipv4.ip_forward", "1")
    sysctl(ns, "net.ipv6.conf.all.forwarding", "1")


def masquerade(ns: str, oifname: str, ipv6: bool = True) -> None:
    """Masquerade what leaves `oifname`; IPv4 only unless `ipv6` (OpenWrt routes
    IPv6 without NAT)."""
    match = "" if ipv6 else "meta nfproto ipv4 "
    rules = f"""
table inet kl_nat {{
    chain post {{
        type nat hook postrouting priority srcnat; policy accept;
        {match}oifname "{oifname}" masquerade
    }}
}}
"""
    # A guest's first nft loads libnftables and the nf_tables modules under
    # software emulation: 30 s ran out once at a host load of 10.
    sh(["nft", "-f", "-"], ns, input=rules, timeout=NFT_TIMEOUT_S)


NFT_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------- topology


@dataclasses.dataclass
class Topology:
    kind: str  # "vlan", "qinq", "pppoe"
    lan_ns: str
    router_ns: str
    wan_ns: str  # the WAN host; for PPPoE the ISP (access concentrator)
    lan_addr: str  # LAN host, IPv4
    wan_addr: str  # far host, IPv4 (the TCP server address)
    router_lan_if: str
    router_wan_if: str  # logical WAN device: VLAN device or PPP device
    router_wan_lowest: str  # the Ethernet device under it (where an offload attaches)
    wan_if: str  # the far host's device carrying wan_addr
    router_wan_addr: str = ""  # the router's own WAN address (the NAT source)
    lan_addr6: str | None = None
    wan_addr6: str | None = None
    router_wan_addr6: str | None = None
    nat: bool = False
    nat6: bool = False  # IPv6 masqueraded too (else routed: the far host routes the LAN /64 back)
    tags: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # outer first
    pppoe: dict = dataclasses.field(default_factory=dict)  # PPPoE extras
    workdir: str = ""

    @property
    def namespaces(self) -> list[str]:
        return [self.lan_ns, self.router_ns, self.wan_ns]


def _prefix() -> str:
    # short: interface names are per namespace, but namespace names show up in logs
    return "kl" + secrets.token_hex(2)


def _three_namespaces(nss: Namespaces, p: str, far: str) -> tuple[str, str, str]:
    """LAN host, router and far host (`far`: "wan" or "isp"); LAN side configured:
    lan0 (LAN host) <-> rl0 (router). The router's WAN veth rw0 <-> w0 is created up,
    without addresses."""
    lan, rtr, wan = nss.add(f"{p}-lan", f"{p}-rtr", f"{p}-{far}")
    ipb(rtr, [
        "link set lo up",
        f"link add rl0 type veth peer name lan0 netns {lan}",
        f"link add rw0 type veth peer name w0 netns {wan}",
        "link set rl0 up",
        "link set rw0 up",
        f"addr add {LAN_NET4}.1/24 dev rl0",
        f"addr add {LAN_NET6}::1/64 dev rl0 nodad",
    ])
    ipb(lan, [
        "link set lo up",
        "link set lan0 up",
        f"addr add {LAN_NET4}.2/24 dev lan0",
        f"addr add {LAN_NET6}::2/64 dev lan0 nodad",
        f"route add default via {LAN_NET4}.1",
        f"route add ::/0 via {LAN_NET6}::1",
    ])
    ipb(wan, ["link set lo up", "link set w0 up"])
    enable_forwarding(rtr)
    return lan, rtr, wan


def _checked_close(nss: Namespaces) -> None:
    errors = nss.close()
    if errors:
        # do not mask the body's exception; report leftovers on stderr
        print("topology cleanup left-overs: " + "; ".join(errors), file=sys.stderr)


@contextlib.contextmanager
def tagged_topology(tags: Sequence[tuple[str, int]], nat: bool = False,
                    nat6: bool | None = None) -> Iterator[Topology]:
    """LAN - router - WAN host, the WAN link carrying `tags` (outer first), e.g.
    [("802.1Q", 7)] or [("802.1ad", 100), ("802.1Q", 7)]. `nat6` (default: `nat`)
    masquerades IPv6 as well; without it IPv6 is routed."""
    nat6 = nat if nat6 is None else nat6
    if not tags:
        raise ValueError("tags must name at least one tag")
    modprobe("8021q")
    net = 2 if len(tags) == 1 else 3
    kind = "vlan" if len(tags) == 1 else "qinq"
    p = _prefix()
    nss = Namespaces()
    try:
        lan, rtr, wan = _three_namespaces(nss, p, "wan")
        r_cmds, w_cmds = [], []
        r_dev, w_dev = "rw0", "w0"
        for proto, vid in tags:
            # stacked names stay short: rw0.100.7 fits IFNAMSIZ
            for cmds, lower in ((r_cmds, r_dev), (w_cmds, w_dev)):
                cmds += [f"link add link {lower} name {lower}.{vid} type vlan "
                         f"protocol {proto} id {vid}", f"link set {lower}.{vid} up"]
            r_dev, w_dev = f"{r_dev}.{vid}", f"{w_dev}.{vid}"
        r_cmds += [f"addr add 198.18.{net}.1/24 dev {r_dev}",
                   f"addr add 2001:db8:{net}::1/64 dev {r_dev} nodad",
                   f"route add default via 198.18.{net}.2",
                   f"route add ::/0 via 2001:db8:{net}::2"]
        w_cmds += [f"addr add 198.18.{net}.2/24 dev {w_dev}",
                   f"addr add 2001:db8:{net}::2/64 dev {w_dev} nodad"]
        if not nat:
            w_cmds += [f"route add {LAN_NET4}.0/24 via 198.18.{net}.1"]
        if not nat6:
            w_cmds += [f"route add {LAN_NET6}::/64 via 2001:db8:{net}::1"]
        ipb(rtr, r_cmds)
        ipb(wan, w_cmds)
        if nat or nat6:
            masquerade(rtr, r_dev, ipv6=nat6)
        yield Topology(
            kind=kind, lan_ns=lan, router_ns=rtr, wan_ns=wan,
            lan_addr=f"{LAN_NET4}.2", wan_addr=f"198.18.{net}.2",
            lan_addr6=f"{LAN_NET6}::2", wan_addr6=f"2001:db8:{net}::2",
            router_wan_addr=f"198.18.{net}.1", router_wan_addr6=f"2001:db8:{net}::1",
            router_lan_if="rl0", router_wan_if=r_dev, router_wan_lowest="rw0", wan_if=w_dev,
            nat=nat, nat6=nat6, tags=list(tags),
        )
    finally:
        _checked_close(nss)


@contextlib.contextmanager
def vlan_bridge_topology(vid: int = 7, nat: bool = False,
                         nat6: bool | None = None) -> Iterator[Topology]:
    """As vlan_topology, but the router's WAN veth rw0 is a tagged member of
    VLAN `vid` on a VLAN-filtering bridge `brw`, and the router's address sits
    on the bridge's VLAN device `brw.<vid>` (OpenWrt's DSA/bridge-VLAN style)."""
    nat6 = nat if nat6 is None else nat6
    modprobe("8021q")
    p = _prefix()
    nss = Namespaces()
    try:
        lan, rtr, wan = _three_namespaces(nss, p, "wan")
        r_dev = f"brw.{vid}"
        ipb(rtr, [
            "link add brw type bridge vlan_filtering 1",
            "link set rw0 master brw",
            "link set brw up",
            f"link add link brw name {r_dev} type vlan id {vid}",
            f"link set {r_dev} up",
            "addr add 198.18.2.1/24 dev " + r_dev,
            f"addr add 2001:db8:2::1/64 dev {r_dev} nodad",
            "route add default via 198.18.2.2",
            "route add ::/0 via 2001:db8:2::2",
        ])
        # rw0 carries VLAN vid tagged; the bridge itself is a member so brw.vid hears it.
        sh(["bridge", "vlan", "add", "dev", "rw0", "vid", str(vid)], rtr)
        sh(["bridge", "vlan", "add", "dev", "brw", "vid", str(vid), "self"], rtr)
        w_dev = f"w0.{vid}"
        w_cmds = [f"link add link w0 name {w_dev} type vlan id {vid}", f"link set {w_dev} up",
                  f"addr add 198.18.2.2/24 dev {w_dev}",
                  f"addr add 2001:db8:2::2/64 dev {w_dev} nodad"]
        if not nat:
            w_cmds += [f"route add {LAN_NET4}.0/24 via 198.18.2.1"]
        if not nat6:
            w_cmds += [f"route add {LAN_NET6}::/64 via 2001:db8:2::1"]
        ipb(wan, w_cmds)
        if nat or nat6:
            masquerade(rtr, r_dev, ipv6=nat6)
        yield Topology(
            kind="vlan", lan_ns=lan, router_ns=rtr, wan_ns=wan,
            lan_addr=f"{LAN_NET4}.2", wan_addr="198.18.2.2",
            lan_addr6=f"{LAN_NET6}::2", wan_addr6="2001:db8:2::2",
            router_wan_addr="198.18.2.1", router_wan_addr6="2001:db8:2::1",
            router_lan_if="rl0", router_wan_if=r_dev, router_wan_lowest="rw0", wan_if=w_dev,
            nat=nat, nat6=nat6, tags=[("802.1Q", vid)],
        )
    finally:
        _checked_close(nss)


def vlan_topology(vid: int = 7, nat: bool = False, nat6: bool | None = None):
    """Router WAN on an 802.1Q sub-interface `rw0.<vid>`; WAN host on the same VLAN."""
    return tagged_topology([("802.1Q", vid)], nat=nat, nat6=nat6)


def qinq_topology(svid: int = 100, cvid: int = 7, nat: bool = False, nat6: bool | None = None):
    """Router WAN on `rw0.<svid>.<cvid>`: 802.1ad outer tag, 802.1Q inner tag."""
    return tagged_topology([("802.1ad", svid), ("802.1Q", cvid)], nat=nat, nat6=nat6)


# --------------------------------------------------------------------------- PPPoE


@dataclasses.dataclass(frozen=True)
class PppoeSession:
    session_id: int  # host order (1 for the first session of pppoe-server)
    peer_mac: str
    device: str
    raw_id: str  # as printed in /proc/net/pppoe


def parse_proc_pppoe(text: str) -> list[PppoeSession]:
    """Parse /proc/net/pppoe. `Id` is the session id in network byte order printed as
    %08X by a little-endian kernel: session 1 reads `00000100`."""
    out = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 3:
            continue
        raw = int(f[0], 16)
        sid = socket.ntohs(raw & 0xFFFF)
        out.append(PppoeSession(sid, f[1].lower(), f[2], f[0]))
    return out


def read_proc_pppoe(ns: str) -> list[PppoeSession]:
    """Sessions listed by /proc/net/pppoe in namespace `ns` (the file is per netns)."""
    with in_netns(ns), open("/proc/thread-self/net/pppoe") as f:
        return parse_proc_pppoe(f.read())


# pppoe-server -k (kernel mode) only works when this file exists; Debian's ppp ships the
# plugin under /usr/lib/pppd/<version>/ instead, and pppoe-server silently falls back to
# user mode (pppd pty /usr/sbin/pppoe ...), where the ISP side has no kernel session.
SERVER_PLUGIN = "/etc/ppp/plugins/rp-pppoe.so"


def _server_kernel_plugin() -> Path | None:
    """Inside the lane guest (/etc is a throw-away overlay there), link Debian's plugin
    where pppoe-server looks for it. Returns the link it created, to remove later."""
    import glob

    if os.path.exists(SERVER_PLUGIN) or os.environ.get("KERNEL_LANE_GUEST") != "1":
        return None
    found = sorted(glob.glob("/usr/lib/pppd/*/rp-pppoe.so")) or sorted(
        glob.glob("/usr/lib/pppd/*/pppoe.so"))
    if not found:
        return None
    link = Path(SERVER_PLUGIN)
    try:
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(found[-1])
    except OSError:
        return None
    return link


def server_sessions(ns: str) -> list[PppoeSession]:
    """The ISP (server) side's sessions: /proc/net/pppoe in kernel mode, else the
    `-e SESSION:MAC` argument pppoe-server gives each user-mode pppoe relay."""
    got = read_proc_pppoe(ns)
    if got:
        return got
    out = []
    for pid in netns_pids(ns):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not argv[0].endswith(b"pppoe"):
            continue
        args = [a.decode(errors="replace") for a in argv]
        if "-e" in args and "-I" in args:
            sid, _, mac = args[args.index("-e") + 1].partition(":")
            out.append(PppoeSession(int(sid), mac.lower(), args[args.index("-I") + 1], "user"))
    return out


PPPOE_SECOND_TARGET = "198.18.201.1"  # on the ISP's lo, routed via the 2nd session
PPPOE_ISP_ADDR6 = "2001:db8:200::1"  # on the ISP's lo; the LAN's /64 is routed, not NATed


def _start_pppd(rtr: str, eth: str, ifname: str, log: Path, first: bool,
                ipv6: bool = False) -> subprocess.Popen:
    args = ["ip", "netns", "exec", rtr, "pppd", "plugin", "pppoe.so", f"nic-{eth}",
            "noauth", "nodetach", "ifname", ifname, "persist", "maxfail", "1",
            "noipdefault", "lcp-echo-interval", "10", "lcp-echo-failure", "3",
            "logfile", str(log)]
    if ipv6:
        args.append("+ipv6")  # IPv6CP: link-local addresses on the ppp device
    args.append("defaultroute" if first else "nodefaultroute")
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _ppp_link_local(ns: str, ifname: str) -> str | None:
    """The IPv6 link-local address IPv6CP put on a ppp device, once it did."""
    for link in ip_json(ns, "-6", "addr", "show", "dev", ifname):
        for ai in link.get("addr_info", []):
            if ai.get("scope") == "link" and ai.get("local"):
                return ai["local"]
    return None


def _ppp_addr(ns: str, ifname: str) -> str | None:
    for link in ip_json(ns, "-4", "addr", "show"):
        if link.get("ifname") == ifname:
            for ai in link.get("addr_info", []):
                if ai.get("local"):
                    return ai["local"]
    return None


def pppd_log_session(log: str | Path) -> tuple[int | None, str | None]:
    """(session id, ppp interface) from a pppd logfile: "PPP session is N" and
    "Using interface NAME". pppd 2.4.9 exports only MACREMOTE (not the session id) to
    ip-up scripts; its log has both."""
    import re

    p = Path(log)
    if not p.exists():
        return None, None
    text = p.read_text(errors="replace")
    sid = re.search(r"PPP session is (\d+)", text)
    dev = re.search(r"Using interface (\S+)", text)
    return (int(sid.group(1)) if sid else None), (dev.group(1) if dev else None)


@contextlib.contextmanager
def pppoe_topology(vid: int | None = None, nat: bool = True, sessions: int = 1,
                   up_timeout: float = 60.0, ipv6: bool = False) -> Iterator[Topology]:
    """LAN - router ==PPPoE== ISP. pppoe-server (kernel mode) in the ISP namespace,
    pppd with the kernel PPPoE plugin in the router: PPP device `pppoe-wan` (default
    route through it). With `vid`, PPPoE runs over an 802.1Q VLAN `rw0.<vid>`.

    `sessions` > 1 starts more pppd clients on the same Ethernet device, one after the
    other (so session N gets id N and 198.18.200.(9+N)): `pppoe-wan1`, `pppoe-wan2`...;
    the ISP then also has 198.18.201.1 on lo, routed by the router via `pppoe-wan1`.
    `topo.pppoe["sessions"]` lists {ifname, addr, log, pppd_pid} per session.

    `ipv6`: IPv6 over the (first) session as a subscriber gets it: IPv6CP on both
    ends (link-local addresses only on the PPP link), the router's default route
    out of `pppoe-wan`, the LAN's 2001:db8:1::/64 routed by the ISP to the
    session (no NAT), the ISP reachable at 2001:db8:200::1 (`topo.wan_addr6`)."""
    if not 1 <= sessions <= 4:
        raise ValueError("sessions: 1..4 (pppoe-server -N 4)")
    modprobe("pppoe", "ppp_generic")
    if vid is not None:
        modprobe("8021q")
    p = _prefix()
    nss = Namespaces()
    plugin_link: Path | None = None
    clients: list[subprocess.Popen] = []
    work = tempfile.mkdtemp(prefix=f"{p}-ppp-")
    try:
        lan, rtr, isp = _three_namespaces(nss, p, "isp")
        r_eth, i_eth = "rw0", "w0"
        if vid is not None:
            r_eth = vlan(rtr, "rw0", vid)
            i_eth = vlan(isp, "w0", vid)
        plugin_link = _server_kernel_plugin()
        opts = Path(work, "pppoe-server-options")
        opts.write_text("noauth\nlcp-echo-interval 10\nlcp-echo-failure 3\nnodefaultroute\n"
                        f"logfile {work}/server-pppd.log\n" + ("+ipv6\n" if ipv6 else ""))
        pidfile = Path(work, "pppoe-server.pid")
        # pppoe-server forks into the background; it and its pppd children live in
        # the ISP namespace and are killed by pid when the namespace is removed.
        sh(["pppoe-server", "-I", i_eth, "-L", PPPOE_ISP_ADDR, "-R", PPPOE_CPE_ADDR,
            "-N", "4", "-O", str(opts), "-k", "-X", str(pidfile)], isp)
        t_up = time.monotonic()
        sess = []
        for n in range(sessions):
            ifname = PPP_IFNAME if n == 0 else f"{PPP_IFNAME}{n}"
            log = Path(work, f"pppd-{ifname}.log")
            client = _start_pppd(rtr, r_eth, ifname, log, first=(n == 0), ipv6=ipv6)
            clients.append(client)

            def session_up(client=client, ifname=ifname, log=log):
                if client.poll() is not None:
                    raise TopologyError(
                        f"pppd for {ifname} exited with {client.returncode}: "
                        f"{log.read_text() if log.exists() else ''}")
                return _ppp_addr(rtr, ifname)

            addr4 = wait_for(f"the PPPoE session on {ifname}", session_up,
                             timeout=up_timeout, interval=0.25)
            sess.append({"ifname": ifname, "addr": addr4, "log": str(log),
                         "pppd_pid": client.pid})
        up_seconds = round(time.monotonic() - t_up, 2)
        if sess[0]["addr"] != PPPOE_CPE_ADDR:
            raise TopologyError(f"first session got {sess[0]['addr']}, not {PPPOE_CPE_ADDR}")
        def isp_ppp_up() -> list[str]:
            devs = [lk["ifname"] for lk in ip_json(isp, "link", "show")
                    if lk.get("link_type") == "ppp" and "UP" in lk.get("flags", [])]
            return devs if len(devs) >= sessions else []

        isp_ppp = wait_for("the ISP's ppp devices", isp_ppp_up, timeout=15.0)
        # the ISP's ppp device towards the first session: the one whose peer is .10
        isp_first = isp_ppp[0]
        for r in ip_json(isp, "route", "show"):
            if r.get("dst") == PPPOE_CPE_ADDR and r.get("dev") in isp_ppp:
                isp_first = r["dev"]
        if nat:
            masquerade(rtr, f"{PPP_IFNAME}*", ipv6=False)
        else:
            ip(isp, "route", "add", f"{LAN_NET4}.0/24", "dev", isp_first)
        if ipv6:
            wait_for("IPv6CP on pppoe-wan", lambda: _ppp_link_local(rtr, PPP_IFNAME),
                     timeout=20.0, interval=0.25)
            wait_for(f"IPv6CP on the ISP's {isp_first}",
                     lambda: _ppp_link_local(isp, isp_first), timeout=20.0, interval=0.25)
            ipb(rtr, [f"route add ::/0 dev {PPP_IFNAME}"])
            ipb(isp, [f"addr add {PPPOE_ISP_ADDR6}/128 dev lo",
                      f"route add {LAN_NET6}::/64 dev {isp_first}"])
        if sessions > 1:
            ip(isp, "addr", "add", f"{PPPOE_SECOND_TARGET}/32", "dev", "lo")
            ip(rtr, "route", "add", f"{PPPOE_SECOND_TARGET}/32", "dev", sess[1]["ifname"])
        yield Topology(
            kind="pppoe", lan_ns=lan, router_ns=rtr, wan_ns=isp,
            lan_addr=f"{LAN_NET4}.2", wan_addr=PPPOE_ISP_ADDR,
            router_wan_addr=PPPOE_CPE_ADDR,
            lan_addr6=f"{LAN_NET6}::2" if ipv6 else None,
            wan_addr6=PPPOE_ISP_ADDR6 if ipv6 else None,
            router_lan_if="rl0", router_wan_if=PPP_IFNAME, router_wan_lowest="rw0",
            wan_if=isp_first, nat=nat,
            tags=[("802.1Q", vid)] if vid is not None else [],
            pppoe={
                "router_eth": r_eth, "isp_eth": i_eth,
                "router_mac": link_mac(rtr, r_eth), "isp_mac": link_mac(isp, i_eth),
                "client_log": sess[0]["log"], "server_pidfile": str(pidfile),
                "local_addr": PPPOE_CPE_ADDR, "peer_addr": PPPOE_ISP_ADDR,
                "sessions": sess, "isp_ppp": isp_ppp,
                "second_target": PPPOE_SECOND_TARGET if sessions > 1 else None,
                "up_seconds": up_seconds,
                "server_mode": "kernel" if plugin_link is not None
                or os.path.exists(SERVER_PLUGIN) else "user",
            },
            workdir=work,
        )
    finally:
        for client in clients:
            if client.poll() is None:
                client.terminate()
        for client in clients:
            try:
                client.wait(timeout=5)
            except subprocess.TimeoutExpired:
                client.kill()
                client.wait(timeout=5)
        _checked_close(nss)
        if plugin_link is not None:
            with contextlib.suppress(OSError):
                plugin_link.unlink()
        with contextlib.suppress(OSError):
            for f in Path(work).iterdir():
                f.unlink()
            os.rmdir(work)


# --------------------------------------------------------------------------- traffic


def recv_all(conn: socket.socket, deadline: float) -> tuple[int, str]:
    """Read until EOF (bounded in count and time): byte count and SHA-256."""
    h = hashlib.sha256()
    n = 0
    for _ in range(1_000_000):  # bounded in count as well as time
        if time.monotonic() > deadline:
            raise TimeoutError(f"deadline passed after {n} bytes")
        b = conn.recv(65536)
        if not b:
            break
        h.update(b)
        n += len(b)
    return n, h.hexdigest()


def tcp_exchange(
    topo: Topology,
    family: int = 4,
    up_bytes: int = 2_000_000,
    down_bytes: int = 4_000_000,
    port: int = 5201,
    timeout: float = 60.0,
    server_addr: str | None = None,
) -> dict:
    """One TCP connection from the LAN host to the far host, in this process (sockets
    made in each namespace through setns, I/O in two threads): the client sends
    `up_bytes` random bytes and shuts down writing; the server reads to EOF, then sends
    `down_bytes` back and closes. Returns each side's view (bytes, sha256, the peer
    address the server saw) and the sha256 of what was sent each way."""
    import threading

    if server_addr is None:
        server_addr = topo.wan_addr if family == 4 else topo.wan_addr6
    if not server_addr:
        raise ValueError(f"topology {topo.kind} has no IPv{family} address")
    af = socket.AF_INET6 if ":" in server_addr else socket.AF_INET
    up, down = os.urandom(up_bytes), os.urandom(down_bytes)
    deadline = time.monotonic() + timeout
    with in_netns(topo.wan_ns):
        srv = socket.socket(af, socket.SOCK_STREAM)
    with in_netns(topo.lan_ns):
        cli = socket.socket(af, socket.SOCK_STREAM)
    server: dict = {}
    try:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((server_addr, port))
        srv.listen(1)
        srv.settimeout(timeout)

        def serve() -> None:
            try:
                conn, peer = srv.accept()
                with conn:
                    conn.settimeout(20.0)
                    n, sha = recv_all(conn, deadline)
                    server.update(peer=peer[0], up_bytes=n, up_sha256=sha)
                    conn.sendall(down)
                    conn.shutdown(socket.SHUT_WR)
                    recv_all(conn, deadline)  # until the client closes
            except Exception as e:  # reported by the caller
                server["error"] = f"{type(e).__name__}: {e}"

        th = threading.Thread(target=serve, name="tcp_exchange-server", daemon=True)
        th.start()
        t0 = time.monotonic()
        try:
            cli.settimeout(20.0)
            cli.connect((server_addr, port))
            cli.sendall(up)
            cli.shutdown(socket.SHUT_WR)
            down_n, down_sha = recv_all(cli, deadline)
        except OSError as e:
            cli.close()
            th.join(timeout=25.0)
            raise TopologyError(f"TCP exchange to [{server_addr}]:{port} failed on the client "
                                f"side: {type(e).__name__}: {e}; server: {server}") from e
        seconds = time.monotonic() - t0
        cli.close()
        th.join(timeout=max(1.0, deadline - time.monotonic()))
        if th.is_alive() or "error" in server:
            raise TopologyError(f"TCP exchange: server side did not finish: {server}")
    finally:
        cli.close()
        srv.close()
    return {
        "client": {"down_bytes": down_n, "down_sha256": down_sha, "seconds": round(seconds, 3)},
        "server": server,
        "expect_up": hashlib.sha256(up).hexdigest(),
        "expect_down": hashlib.sha256(down).hexdigest(),
        "up_bytes": up_bytes,
        "down_bytes": down_bytes,
    }


def assert_exchange_intact(res: dict) -> None:
    c, s = res["client"], res["server"]
    assert s["up_bytes"] == res["up_bytes"], f"server got {s['up_bytes']} of {res['up_bytes']}"
    assert s["up_sha256"] == res["expect_up"], "LAN->WAN payload corrupted"
    assert c["down_bytes"] == res["down_bytes"], (
        f"client got {c['down_bytes']} of {res['down_bytes']}")
    assert c["down_sha256"] == res["expect_down"], "WAN->LAN payload corrupted"


def expected_peer(topo: Topology, family: int = 4) -> str:
    """The source address the far host sees: the router's WAN address with NAT, the
    LAN host's without."""
    if family == 4:
        return topo.router_wan_addr if topo.nat else topo.lan_addr
    return (topo.router_wan_addr6 if topo.nat6 else topo.lan_addr6) or ""


# --------------------------------------------------------------------------- wire view

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_AUXDATA = 8
TP_STATUS_VLAN_VALID = 0x10
TP_STATUS_VLAN_TPID_VALID = 0x40
PACKET_OUTGOING = 4
TAG_TPIDS = (0x8100, 0x88A8)
ETH_P_PPP_SES = 0x8864


@dataclasses.dataclass(frozen=True)
class Frame:
    """One frame as it is on the wire of a device, tags restored (an skb may carry
    the outer tag in metadata: PACKET_AUXDATA gives it back)."""

    outgoing: bool
    dst: str
    src: str
    tags: tuple[tuple[int, int], ...]  # ((tpid, vid), ...), outer first
    ethertype: int  # after the tags
    pppoe_session: int | None = None
    ppp_proto: int | None = None
    ip_src: str | None = None  # IPv4/IPv6 inside (also inside PPPoE)
    ip_dst: str | None = None
    ip_proto: int | None = None  # 6 = TCP


def _mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def parse_frame(data: bytes, aux: tuple | None, outgoing: bool) -> Frame | None:
    if len(data) < 14:
        return None
    tags: list[tuple[int, int]] = []
    if aux is not None:
        status, _len, _snap, _mac_off, _net, tci, tpid = aux
        if status & TP_STATUS_VLAN_VALID:
            tags.append((tpid if status & TP_STATUS_VLAN_TPID_VALID else 0x8100, tci & 0xFFF))
    off = 12
    et = int.from_bytes(data[off:off + 2], "big")
    for _ in range(4):
        if et not in TAG_TPIDS or len(data) < off + 6:
            break
        tags.append((et, int.from_bytes(data[off + 2:off + 4], "big") & 0xFFF))
        off += 4
        et = int.from_bytes(data[off:off + 2], "big")
    sid = proto = None
    l3, l3_off = et, off + 2
    if et == ETH_P_PPP_SES and len(data) >= off + 10:
        sid = int.from_bytes(data[off + 4:off + 6], "big")
        proto = int.from_bytes(data[off + 8:off + 10], "big")
        l3 = {0x0021: 0x0800, 0x0057: 0x86DD}.get(proto, 0)
        l3_off = off + 10
    src = dst = ipp = None
    if l3 == 0x0800 and len(data) >= l3_off + 20:
        src = socket.inet_ntop(socket.AF_INET, data[l3_off + 12:l3_off + 16])
        dst = socket.inet_ntop(socket.AF_INET, data[l3_off + 16:l3_off + 20])
        ipp = data[l3_off + 9]
    elif l3 == 0x86DD and len(data) >= l3_off + 40:
        src = socket.inet_ntop(socket.AF_INET6, data[l3_off + 8:l3_off + 24])
        dst = socket.inet_ntop(socket.AF_INET6, data[l3_off + 24:l3_off + 40])
        ipp = data[l3_off + 6]
    return Frame(outgoing, _mac(data[0:6]), _mac(data[6:12]), tuple(tags), et, sid, proto,
                 src, dst, ipp)


class Sniffer:
    """A raw packet socket on `dev` in namespace `ns`, opened before the traffic and
    drained after it (bounded: at most `limit` frames, buffer 8 MB)."""

    def __init__(self, ns: str, dev: str) -> None:
        with in_netns(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                                      socket.htons(ETH_P_ALL))
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        self.sock.bind((dev, 0))
        self.sock.setblocking(False)
        self.errors: list[int | None] = []  # errno of receives that failed

    def frames(self, limit: int = 20000) -> list[Frame]:
        import struct

        out: list[Frame] = []
        for _ in range(limit):
            try:
                data, anc, _flags, addr = self.sock.recvmsg(65535, socket.CMSG_SPACE(20))
            except BlockingIOError:
                break
            except OSError as e:  # seen once on 6.1 (EFAULT) under load: skip it
                self.errors.append(e.errno)
                continue
            aux = None
            for level, typ, cdata in anc:
                if level == SOL_PACKET and typ == PACKET_AUXDATA and len(cdata) >= 20:
                    aux = struct.unpack("IIIHHHH", cdata[:20])
            f = parse_frame(data, aux, addr[2] == PACKET_OUTGOING)
            if f is not None:
                out.append(f)
        return out

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Sniffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- guest guard


def require_guest() -> None:
    """Call at the top of a guest module: outside the lane (e.g. host pytest given the
    path by hand) skip the module instead of failing on missing VLAN/PPP support."""
    import pytest

    if os.environ.get("KERNEL_LANE_GUEST") != "1":
        pytest.skip("guest module: runs inside the 6.1 kernel lane "
                    "(python tests/kernel_lane/lane.py <module>)", allow_module_level=True)
    if os.geteuid() != 0:
        pytest.fail("the kernel lane guest must run as root", pytrace=False)


BPFFS = Path("/sys/fs/bpf")


def is_bpffs(p: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(p) and line.split()[2] == "bpf" for line in f)


@contextlib.contextmanager
def bpffs_session() -> Iterator[Path]:
    """bpffs on /sys/fs/bpf (the guest does not mount it); whatever is pinned
    inside the block is removed afterwards, and the mount too if made here."""
    mounted_here = False
    if not is_bpffs(BPFFS):
        sh(["mount", "-t", "bpf", "bpf", str(BPFFS)])
        mounted_here = True
    before = set(os.listdir(BPFFS))
    try:
        yield BPFFS
    finally:
        for name in set(os.listdir(BPFFS)) - before:
            subprocess.run(["rm", "-rf", str(BPFFS / name)], check=False, timeout=30)
        if mounted_here:
            subprocess.run(["umount", str(BPFFS)], check=False, timeout=30)
