"""The reliability campaign's scenarios (docs/reliability.md), shared by the
tests (short runs, asserted there) and ``python -m bench.reliability`` (the
long runs, whose figures the docs quote). Each scenario takes a lab
topology, runs its stimulus against an offloaded transfer and returns what
it saw as a dict; nothing here asserts except where a step cannot go on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from offloader.lab import Topology
from tests.integration.transfer import background_transfer
from tests.poll import poll as wait_for


def senders_plain(topo: Topology) -> None:
    """Packet counts mean packets: no TSO/GSO on the sending hosts."""
    for host in (topo.lan1, topo.lan2, topo.wan):
        host.sh("ethtool -K eth0 tso off gso off >/dev/null")


class Transfer:
    """A lab transfer in a thread; ``result`` once it has finished."""

    def __init__(self, topo: Topology, **kw: Any) -> None:
        self._thread, self.result = background_transfer(topo, **kw)

    def join(self, timeout: float) -> dict[str, Any]:
        self._thread.join(timeout)
        return self.result


def flows_of(topo: Topology, proto: str, sport: int) -> list[dict[str, Any]]:
    """Both directions' flows of the connection from ``sport`` (the reply's
    destination port is the source port, or its NAT mapping)."""
    st = topo.status(check=False) or {"flows": []}
    return [f for f in st["flows"] if f["proto"] == proto and sport in (f["sport"], f["dport"])]


def offloaded(topo: Topology, proto: str, sport: int) -> list[dict[str, Any]]:
    return [f for f in flows_of(topo, proto, sport) if f["state"] == "offloaded"]


def packets_of(topo: Topology, proto: str, sport: int) -> int:
    return sum(f["packets"] for f in offloaded(topo, proto, sport))


def moving(topo: Topology, proto: str, sport: int, timeout: float = 10.0) -> bool:
    """The connection's offloaded counters move (the datapath forwards it)."""
    first = packets_of(topo, proto, sport)
    return bool(wait_for(lambda: packets_of(topo, proto, sport) > first, timeout=timeout))


def pinned_stat(topo: Topology, name: str) -> int:
    """A datapath counter read from the pinned stats map (bpftool): readable
    while the agent is dead or stopped."""
    from offloader.layout import layout

    index = layout().const(f"OFL_STAT_{name.upper()}")
    key = " ".join(str(b) for b in index.to_bytes(4, "little"))
    out = subprocess.run(f"bpftool -j map lookup pinned {topo.pin_dir()}/ofl_stats key {key}",
                         shell=True, capture_output=True, text=True, timeout=10).stdout
    values = json.loads(out).get("values", [])
    return sum(int(v["value"]) if isinstance(v["value"], int)
               else int.from_bytes(bytes(int(b, 16) for b in v["value"]), "little")
               for v in values)


def cli_status(topo: Topology) -> subprocess.CompletedProcess[str]:
    """``ebpf-offloader status`` as a user types it (human output)."""
    return topo.cli("status", check=False)


# -- faults ---------------------------------------------------------------------------
def faults(topo: Topology, *, heartbeat: float = 1.0, size: int = 7_500_000,
           rate: int = 300_000, sport: int = 41100) -> dict[str, Any]:
    """SIGKILL and restart, SIGSTOP past the heartbeat timeout and SIGCONT,
    a clean restart: each during one offloaded TCP transfer. The agent runs
    under ``nsenter --net`` so that its maps are pinned (adoption)."""
    extra = ["-o", f"heartbeat_timeout={heartbeat}"]
    senders_plain(topo)
    topo.start_agent(hook="xdp", nsenter=True, extra=extra)
    out: dict[str, Any] = {"heartbeat_timeout_s": heartbeat}
    transfer = Transfer(topo, proto="tcp", family=4, size=size, rate_pps=rate,
                        timeout=120, sport=sport)
    try:
        out["offloaded_first"] = bool(wait_for(lambda: offloaded(topo, "tcp", sport)))

        # SIGKILL: no agent; the datapath's heartbeat goes stale and it passes.
        stale = pinned_stat(topo, "pass_stale")
        assert topo.agent is not None
        topo.stop_agent(sig=signal.SIGKILL)
        killed = cli_status(topo)
        out["kill_status"] = {"rc": killed.returncode, "stderr": killed.stderr.strip()}
        out["kill_fail_safe"] = bool(wait_for(lambda: pinned_stat(topo, "pass_stale") > stale,
                                              timeout=heartbeat + 10))
        out["kill_pass_stale"] = pinned_stat(topo, "pass_stale") - stale
        topo.start_agent(hook="xdp", nsenter=True, extra=extra)
        out["kill_adopted"] = "adopted" in topo.read_agent_log()
        out["kill_offloaded_after"] = bool(wait_for(lambda: offloaded(topo, "tcp", sport)))
        out["kill_moving_after"] = moving(topo, "tcp", sport)

        # SIGSTOP past the heartbeat timeout: status cannot be answered.
        assert topo.agent is not None
        stale = pinned_stat(topo, "pass_stale")
        topo.agent.send_signal(signal.SIGSTOP)
        try:
            stopped = cli_status(topo)  # waits for the client's timeout (10 s)
            out["stop_status"] = {"rc": stopped.returncode, "stderr": stopped.stderr.strip()}
            out["stop_fail_safe"] = bool(wait_for(
                lambda: pinned_stat(topo, "pass_stale") > stale, timeout=heartbeat + 10))
        finally:
            topo.agent.send_signal(signal.SIGCONT)
        out["stop_pass_stale"] = pinned_stat(topo, "pass_stale") - stale
        resumed = wait_for(lambda: topo.status(check=False), timeout=10)
        out["stop_status_after"] = bool(resumed)
        out["stop_offloaded_after"] = bool(wait_for(lambda: offloaded(topo, "tcp", sport)))
        out["stop_moving_after"] = moving(topo, "tcp", sport)

        # A clean restart adopts the pinned flows: offloaded at once.
        topo.stop_agent()
        topo.start_agent(hook="xdp", nsenter=True, extra=extra)
        out["restart_adopted"] = "adopted" in topo.read_agent_log()
        out["restart_offloaded_at_once"] = bool(offloaded(topo, "tcp", sport))
        out["restart_moving_after"] = moving(topo, "tcp", sport)
        st = topo.status() or {}
        out["restart_pass_stale_total"] = st.get("datapath", {}).get("pass_stale")
    finally:
        out["transfer"] = transfer.join(timeout=150)
        topo.stop_agent()
    return out


# -- flood ----------------------------------------------------------------------------
def _proc(pid: int) -> tuple[float, float]:
    """(CPU seconds, RSS MB) of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    return cpu, rss


def flood_object() -> str:
    """bench/flood.bpf.o, built if missing."""
    from bench.tools import build

    return str(build()["flood"])


def flood(topo: Topology, *, seconds: float = 8.0, offered: float = 2_000_000,
          rate: int = 400_000, pending_flows: int = 8192) -> dict[str, Any]:
    """New 5-tuples from the WAN host to the router as fast as live frames
    go (``offered`` per second, paced), for ``seconds``, while two TCP
    transfers (one each way, the second through the port forward) are
    offloaded. Samples status, agent CPU and RSS about once a second."""
    from offloader.lab import ROUTER_WAN4, WAN_4

    senders_plain(topo)
    topo.start_agent(hook="xdp", verbose=False, extra=["-o", f"pending_flows={pending_flows}"])
    assert topo.agent is not None
    pid = topo.agent.pid
    size = int(rate * (seconds + 12))
    up = Transfer(topo, proto="tcp", family=4, size=size, rate_pps=rate, timeout=seconds + 90,
                  sport=41200)
    down = Transfer(topo, proto="tcp", family=4, size=size, rate_pps=rate, timeout=seconds + 90,
                    dnat=True, sport=41201)
    out: dict[str, Any] = {"seconds": seconds, "offered_pps": offered,
                           "pending_flows": pending_flows}
    try:
        out["offloaded_before"] = bool(wait_for(lambda: len(offloaded(topo, "tcp", 41200)) == 2
                                                and len(offloaded(topo, "tcp", 41201)) == 2))
        st0 = topo.status() or {}
        mac = topo.router.sh("cat /sys/class/net/wan0/address").stdout.strip()
        cpu0, rss0 = _proc(pid)
        wall0 = time.monotonic()
        inj = topo.wan.popen(sys.executable, "-m", "bench.flood", flood_object(), "eth0", mac,
                             WAN_4, ROUTER_WAN4, str(offered), str(seconds),
                             stdout=subprocess.PIPE)
        samples: list[dict[str, Any]] = []
        last = {41200: packets_of(topo, "tcp", 41200), 41201: packets_of(topo, "tcp", 41201)}
        while inj.poll() is None:
            asked = time.monotonic()
            # paces the loop; only the busiest flows (the two transfers are far
            # busier than the flood's one-packet tuples): the whole report on
            # the flood's 24,000 entries took up to 8.3 s on a slower machine,
            # leaving one sample in the 10 s (CI, 2026-12-03)
            proc = topo.cli("status", "--json", "--limit", "50", check=False)
            if proc.returncode != 0:
                out["status_failed"] = out.get("status_failed", 0) + 1
                out["status_error"] = proc.stderr.strip()[-300:]
                continue
            st = json.loads(proc.stdout)
            now = {p: sum(f["packets"] for f in st["flows"] if f["state"] == "offloaded"
                          and f["proto"] == "tcp" and p in (f["sport"], f["dport"]))
                   for p in last}
            samples.append({"pending": st["counts"]["pending"],
                            "flows_used": st["flows_used"],
                            "moving": all(now[p] > last[p] for p in last),
                            "rss_mb": _proc(pid)[1],
                            "status_s": time.monotonic() - asked})
            last = now
        injected = json.loads((inj.communicate(timeout=30)[0] or "{}").splitlines()[-1])
        cpu1, _ = _proc(pid)
        wall = time.monotonic() - wall0
        st1 = topo.status() or {}
        d0, d1 = st0.get("datapath", {}), st1.get("datapath", {})
        out.update({
            "injected": injected.get("injected"),
            "injected_pps": round(injected.get("injected", 0) / max(injected.get("seconds", 1), 1e-9)),
            "router_rx_pps": round((d1.get("rx", 0) - d0.get("rx", 0)) / wall),
            "new_tuples": d1.get("new", 0) - d0.get("new", 0),
            "ring_buffer_drops": d1.get("event_drop", 0) - d0.get("event_drop", 0),
            "pass_stale": d1.get("pass_stale", 0) - d0.get("pass_stale", 0),
            "ring_buffer_drops_in_status": st1.get("ring_buffer_drops"),
            "conntrack_event_overflows": st1.get("agent", {}).get("conntrack_event_overflows"),
            "reconciles": st1.get("agent", {}).get("conntrack_reconciles"),
            "samples": len(samples),
            "samples_moving": sum(s["moving"] for s in samples),
            "pending_max": max((s["pending"] for s in samples), default=0),
            "flows_used_max": max((s["flows_used"] for s in samples), default=0),
            "status_s_max": round(max((s["status_s"] for s in samples), default=0), 2),
            "agent_cpu_pct": round(100 * (cpu1 - cpu0) / wall, 1),
            "agent_rss_mb_before": round(rss0, 1),
            "agent_rss_mb_max": round(max((s["rss_mb"] for s in samples), default=rss0), 1),
            "offloaded_after": len(offloaded(topo, "tcp", 41200)) == 2
            and len(offloaded(topo, "tcp", 41201)) == 2,
            "agent_alive": topo.agent.poll() is None,
            "human_status": cli_status(topo).stdout,
        })
    finally:
        out["transfer_up"] = up.join(timeout=seconds + 120)
        out["transfer_down"] = down.join(timeout=30)
        topo.stop_agent()
    return out


# -- churn ----------------------------------------------------------------------------
SWEEP_S = 1.0  # the agent's default sweep_interval
NH2 = "198.19.2.3"  # a second next hop on the WAN link (a macvlan in the WAN host)


def _torn(topo: Topology, reason: str) -> int:
    st = topo.status(check=False) or {"agent": {"torn_down": {}}}
    return int(st["agent"]["torn_down"].get(reason, 0))


def add_second_next_hop(topo: Topology) -> str:
    """nh2 in the WAN host: another MAC on the same link that accepts the
    WAN host's traffic (its addresses are the namespace's). Returns its MAC."""
    topo.wan.sh(f"ip link add nh2 link eth0 type macvlan mode bridge && "
                f"ip addr add {NH2}/24 dev nh2 && ip link set nh2 up")
    mac = topo.wan.sh("cat /sys/class/net/nh2/address").stdout.strip()
    topo.router.sh(f"ip neigh replace {NH2} lladdr {mac} dev wan0 nud permanent")
    return mac


def churn_case(topo: Topology, name: str, change: Callable[[], None],
               converged: Callable[[], bool], restore: Callable[[], None] | None = None, *,
               sport: int, expect_intact: bool = True, size: int = 2_400_000,
               rate: int = 300_000, dport: int = 0) -> dict[str, Any]:
    """One offloaded TCP transfer; ``change`` while it runs; how long until
    ``converged`` holds (polled, bounded by a few sweeps); the transfer's end."""
    if dport:
        from offloader.lab import WAN_4, _transfer

        box: dict[str, Any] = {}

        def go() -> None:
            try:
                box.update(_transfer(topo.lan1, topo.wan, WAN_4, dport, dport, "tcp", 4, size,
                                     60, rate, sport))
            except Exception as exc:  # noqa: BLE001
                box["error"] = repr(exc)

        thread = threading.Thread(target=go, daemon=True)
        thread.start()
        transfer = None
    else:
        transfer = Transfer(topo, proto="tcp", family=4, size=size, rate_pps=rate, timeout=60,
                            sport=sport)
    out: dict[str, Any] = {"case": name}
    try:
        out["offloaded_before"] = bool(wait_for(lambda: len(offloaded(topo, "tcp", sport)) == 2))
        start = time.monotonic()
        change()
        ok = wait_for(converged, timeout=4 * SWEEP_S + 2, step=0.05)
        out["converged"] = bool(ok)
        out["converge_s"] = round(time.monotonic() - start, 2) if ok else None
        if restore:
            restore()
    finally:
        if transfer is not None:
            result = transfer.join(timeout=90)
        else:
            thread.join(timeout=90)
            result = box
    out["intact"] = bool(result.get("intact"))
    out["as_expected"] = out["intact"] == expect_intact
    out["transfer"] = {k: v for k, v in result.items() if k in ("received", "size", "seconds",
                                                                "error")}
    return out


def churn(topo: Topology) -> list[dict[str, Any]]:
    """Route, neighbour, link, conntrack flush and address changes, each
    during its own offloaded transfer, one after the other in one lab."""
    from offloader.lab import ROUTER_WAN4, WAN_4

    senders_plain(topo)
    topo.start_agent(hook="xdp", verbose=False)
    nh2_mac = add_second_next_hop(topo)
    wan_mac = topo.wan.sh("cat /sys/class/net/eth0/address").stdout.strip()
    cases = []

    def via_nh2(sport: int) -> Callable[[], bool]:
        """The datapath forwards the flow again, now to nh2's MAC: offloaded,
        its counters moved since the previous poll, nh2 receiving. Counted
        in bytes: the WAN host's GRO hands nh2 a few super-packets a poll
        (8 for 144 segments here), fewer the faster the polls come."""
        last = {"rx": topo.wan.link_stat("nh2", "rx_bytes"), "packets": -1}

        def check() -> bool:
            rx, packets = topo.wan.link_stat("nh2", "rx_bytes"), packets_of(topo, "tcp", sport)
            ok = (rx - last["rx"] >= 5 * 1448 and len(offloaded(topo, "tcp", sport)) == 2
                  and last["packets"] >= 0 and packets > last["packets"])
            last["rx"], last["packets"] = rx, packets
            return ok
        return check

    def again(sport: int) -> Callable[[], bool]:
        """Offloaded again, counters moving since the previous poll."""
        last = {"packets": -1}

        def check() -> bool:
            packets = packets_of(topo, "tcp", sport)
            ok = (len(offloaded(topo, "tcp", sport)) == 2 and last["packets"] >= 0
                  and packets > last["packets"])
            last["packets"] = packets if offloaded(topo, "tcp", sport) else -1
            return ok
        return check

    # Route change: WAN_4 via the second next hop.
    cases.append(churn_case(
        topo, "route change to another next hop",
        lambda: topo.router.sh(f"ip route replace {WAN_4}/32 via {NH2} dev wan0"),
        via_nh2(42001), lambda: topo.router.sh(f"ip route del {WAN_4}/32"), sport=42001))

    # Neighbour MAC change: WAN_4's neighbour entry now names nh2's MAC.
    cases.append(churn_case(
        topo, "neighbour MAC change",
        lambda: topo.router.sh(f"ip neigh replace {WAN_4} lladdr {nh2_mac} dev wan0 nud permanent"),
        via_nh2(42002),
        lambda: topo.router.sh(f"ip neigh replace {WAN_4} lladdr {wan_mac} dev wan0 nud reachable"),
        sport=42002))

    # Link down/up: torn down at once, offloaded again after the link returns.
    def link_bounce() -> None:
        base = _torn(topo, "route or link change")
        topo.router.sh("ip link set wan0 down")
        wait_for(lambda: _torn(topo, "route or link change") > base, timeout=4 * SWEEP_S)
        topo.router.sh(f"ip link set wan0 up && ip neigh replace {NH2} lladdr {nh2_mac} "
                       "dev wan0 nud permanent")

    cases.append(churn_case(
        topo, "link down and up", link_bounce,
        again(42003), sport=42003))

    # conntrack -F: every entry destroyed; the kernel picks the connection up
    # again from its next packets (tcp_loose) and the agent offloads it anew.
    flushed = {"base": 0}

    def flush() -> None:
        flushed["base"] = _torn(topo, "conntrack-destroyed")
        topo.router.sh("conntrack -F >/dev/null 2>&1")

    moved = again(42004)
    cases.append(churn_case(
        topo, "conntrack -F", flush,
        lambda: _torn(topo, "conntrack-destroyed") > flushed["base"] and moved(),
        sport=42004))

    # Address removed: the kernel drops the masqueraded entries and the
    # connected route; the agent must stop forwarding too, so nothing more
    # reaches the WAN host. The address returns 2 s later and TCP resumes
    # through a fresh masquerade entry, as it would without the agent.
    def stopped() -> bool:
        if offloaded(topo, "tcp", 42005):
            return False
        before = topo.wan.link_stat("eth0", "rx_packets")
        time.sleep(2 * SWEEP_S)
        return topo.wan.link_stat("eth0", "rx_packets") - before < 10  # ARP/ND at most

    cases.append(churn_case(
        topo, "address removed",
        lambda: topo.router.sh(f"ip addr del {ROUTER_WAN4}/24 dev wan0"), stopped,
        lambda: topo.router.sh(f"ip addr add {ROUTER_WAN4}/24 dev wan0 && ip neigh replace "
                               f"{WAN_4} lladdr {wan_mac} dev wan0 nud reachable"),
        sport=42005))
    cases.append(_table_full(topo))
    topo.stop_agent()
    return cases


CT_MAX = "/proc/sys/net/netfilter/nf_conntrack_max"


def _ct_drops(topo: Topology) -> int:
    """The router namespace's conntrack 'drop' statistic, all CPUs."""
    out = topo.router.sh("conntrack -S").stdout
    return sum(int(w.split("=")[1]) for w in out.split() if w.startswith("drop="))


def _table_full(topo: Topology) -> dict[str, Any]:
    """nf_conntrack_max reached during an offloaded transfer. The limit is
    global (a namespace cannot set its own), so it is set to the router
    namespace's own count and restored however the case ends. The offloaded
    connection keeps its entry (refreshes allocate nothing) and completes; a
    new one gets no entry and the kernel drops its packet, as it would
    without the agent, which neither offloads nor drops it itself."""
    from offloader.lab import WAN_4

    with open(CT_MAX) as f:
        original = f.read().strip()
    probe = {"drops": 0}

    def set_max(value: str) -> None:
        with open(CT_MAX, "w") as f:
            f.write(value)

    def fill() -> None:
        # Unassured entries would be early-dropped to make room: none left.
        for proto in ("udp", "icmp", "icmpv6"):
            topo.router.sh(f"conntrack -D -p {proto} >/dev/null 2>&1", check=False)
        probe["drops"] = _ct_drops(topo)
        set_max(topo.router.sh("conntrack -C").stdout.strip())

    def refused() -> bool:
        topo.lan1.sh(f"python3 -c \"import socket; s = socket.socket(socket.AF_INET, "
                     f"socket.SOCK_DGRAM); s.bind(('', 42998)); s.sendto(b'x', ('{WAN_4}', "
                     f"42999))\"")
        entries = topo.router.sh("conntrack -L -p udp --dport 42999 2>/dev/null").stdout
        probe_flows = flows_of(topo, "udp", 42998)
        return (_ct_drops(topo) > probe["drops"] and "42999" not in entries
                and all(f["state"] not in ("offloaded", "dropped") for f in probe_flows)
                and moving(topo, "tcp", 42006, timeout=2))

    try:
        return churn_case(topo, "nf_conntrack_max reached", fill, refused,
                          lambda: set_max(original), sport=42006)
    finally:
        set_max(original)


ZONE_RULES = """
table inet campaign_zone {
    chain pre {
        type filter hook prerouting priority -300; policy accept;
        iifname { "br-lan", "wan0" } ct zone set 7
    }
}
"""

HELPER_RULES = """
table inet campaign_helper {
    ct helper ftp_std { type "ftp" protocol tcp; }
    chain pre {
        type filter hook prerouting priority 0; policy accept;
        tcp dport 2121 ct helper set "ftp_std"
    }
}
"""


def zones_and_helpers(topo: Topology) -> list[dict[str, Any]]:
    """A zone set by an nft rule (the agent must query zone 7), and a
    connection with the FTP helper (stays with the kernel)."""
    senders_plain(topo)
    topo.router.sh("nft -f -", input=ZONE_RULES)
    topo.start_agent(hook="xdp", verbose=False)
    cases = []
    zoned = churn_case(topo, "conntrack zone set by an nft rule", lambda: None,
                       lambda: bool(offloaded(topo, "tcp", 42010)), sport=42010)
    listing = topo.router.sh("conntrack -L -w 7 -p tcp 2>/dev/null").stdout
    zoned["entry_in_zone_7"] = "sport=42010" in listing
    cases.append(zoned)
    topo.router.sh("nft delete table inet campaign_zone")
    topo.router.sh("conntrack -F >/dev/null 2>&1")
    topo.router.sh("nft -f -", input=HELPER_RULES)
    seen: dict[str, bool] = {}
    states: set[str] = set()

    def with_kernel() -> bool:
        listing = topo.router.sh("conntrack -L -p tcp --dport 2121 2>/dev/null").stdout
        seen["kernel_helper"] = seen.get("kernel_helper", False) or "helper=ftp" in listing
        flows = flows_of(topo, "tcp", 42011)
        states.update(f["state"] for f in flows)
        if "offloaded" in states:
            seen["ever_offloaded"] = True
        st = topo.status(check=False) or {"agent": {}}
        by_helper = st["agent"].get("passed_by_reason", {}).get("helper", 0)
        return bool(by_helper) and seen["kernel_helper"] and not seen.get("ever_offloaded")

    helped = churn_case(topo, "connection with the FTP helper", lambda: None, with_kernel,
                        sport=42011, dport=2121)
    helped["kernel_helper"] = seen.get("kernel_helper", False)
    helped["ever_offloaded"] = seen.get("ever_offloaded", False) or "offloaded" in states
    st = topo.status() or {}
    helped["passed_helper"] = st.get("agent", {}).get("passed_by_reason", {}).get("helper", 0)
    helped["states"] = sorted(states | {f["state"] for f in flows_of(topo, "tcp", 42011)})
    cases.append(helped)
    topo.router.sh("nft delete table inet campaign_helper")
    topo.stop_agent()
    return cases
