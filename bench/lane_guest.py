"""Guest side of `python -m bench --kernel-lane`: runs inside Debian's 6.1 kernel
(booted by bench/lane.py through tests/kernel_lane/lane.py, which runs pytest
modules in the guest; hence the one test at the bottom).

In one lab (offloader.lab, the bench's topology) it measures, per mode, the
64-byte UDP test and the TCP test of the bench, router cost from the LAN
port's threaded NAPI kthread (pinned to CPU 1) as bench/run.py does. The
sender is, by default, the NIC-like host of bench/wire.py: its frames reach
the router's port lan3p as XDP frames in lan3p's NAPI, as a driver takes
frames from its ring, in every mode (`sender: veth` in the config: lan1 on
its plain veth, whose skbs XDP must copy first). The WAN
host's receive work runs in its own kthread on CPU 0, beside the sender, never
on the router's CPU. Packets are counted where the router sent them (the WAN
veth's tx_packets + tx_dropped: a frame the WAN host's full queue refused was
still forwarded by the router) and where they arrived (bench/count.bpf.c).

Every step is appended to progress.jsonl in the shared directory (flushed and
fsynced) so that the host sees where the guest is; every mode has a guest-side
deadline (SIGALRM), the host a deadline of its own per mode (bench/lane.py),
for a guest kernel that no longer runs user space. watch.log gets, every few
seconds, the kernel's warnings and the tasks in D state with their stacks.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench import lane as spec

SHARED = Path(os.environ.get("KERNEL_LANE_SHARED") or "/nonexistent")


class ModeTimeout(Exception):
    pass


@dataclass(frozen=True)
class Feed:
    """Where the measured traffic comes from: the sending host, its address,
    and the router port its frames arrive on (whose NAPI kthread is the
    router's CPU)."""

    host: Any
    src: str
    port: str
    nic: bool  # frames arrive as XDP frames (bench/wire.py), not as the sender's skbs
    router_mac: str = ""  # br-lan's: the destination of the NIC-like sender's live frames


@contextlib.contextmanager
def feed(topo: Any, bins: dict[str, Path], sender: str) -> Iterator[Feed]:
    """``nic``: the NIC-like host of bench/wire.py, wired to lan3p (removed on
    the way out); ``veth``: lan1 on lan1p, as the lab has it."""
    from offloader.lab import LAN1_4
    if sender == "veth":
        yield Feed(topo.lan1, LAN1_4, "lan1p", nic=False)
        return
    from bench import wire
    with wire.nic_sender(topo, bins["wire"]) as host:
        mac = topo.router.sh("cat /sys/class/net/br-lan/address").stdout.strip()
        yield Feed(host, wire.NIC_4, wire.PORT, nic=True, router_mac=mac)


class Progress:
    """progress.jsonl and results.jsonl in the shared directory."""

    def __init__(self, shared: Path) -> None:
        self.shared = shared
        self.mode = "setup"
        self.step = ""
        self.round: int | None = None

    def _append(self, name: str, rec: dict[str, Any]) -> None:
        with open(self.shared / name, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def at(self, mode: str, step: str, **kw: Any) -> None:
        self.mode, self.step = mode, step
        rec = {"t": round(time.monotonic(), 2), "mode": mode, "round": self.round, "step": step, **kw}
        self._append("progress.jsonl", rec)
        print(f"[lane {time.strftime('%H:%M:%S')}] {mode}: {step} {kw or ''}", file=sys.stderr, flush=True)

    def result(self, rec: dict[str, Any]) -> None:
        self._append("results.jsonl", rec)


@contextlib.contextmanager
def deadline(seconds: float, prog: Progress) -> Iterator[None]:
    """Raise ModeTimeout in the main thread after ``seconds`` (also out of a
    blocking wait: the handler raises between the retries PEP 475 makes)."""
    def fire(*_: Any) -> None:
        raise ModeTimeout(f"guest deadline of {seconds:.0f} s at {prog.mode}: {prog.step}")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _d_state_tasks() -> list[str]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            text = stat.read_text()
            comm = text[text.index("(") + 1:text.rindex(")")]
            if text[text.rindex(")") + 2] != "D":
                continue
            pid = stat.parent.name
            stack = ""
            with contextlib.suppress(OSError):
                stack = " < ".join(line.split()[-1] for line in
                                   (stat.parent / "stack").read_text().splitlines()[:8])
            out.append(f"{pid} {comm}: {stack}")
    return out


WATCHED = ("blast", "napi/", "iperf3", "ksoftirqd")


def _watched_tasks() -> list[str]:
    """State, CPU time, last CPU and kernel stack of the tasks a stuck
    measurement involves: the sender, the NAPI kthreads, iperf3."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            comm = text[text.index("(") + 1:text.rindex(")")]
            if not comm.startswith(WATCHED):
                continue
            f = text[text.rindex(")") + 2:].split()
            run_ns = int((stat.parent / "schedstat").read_text().split()[0])
            if comm.startswith("ksoftirqd") and run_ns < 5e7:
                continue
            stack = " < ".join(line.split()[-1] for line in
                               (stat.parent / "stack").read_text().splitlines()[:6])
            out.append(f"{stat.parent.name} {comm} state={f[0]} cpu={f[36]} run={run_ns / 1e9:.2f}s {stack}")
    return out


def watch(shared: Path, stop: threading.Event, every: float = 4.0) -> None:
    """watch.log: kernel messages of level warning or worse since the start,
    tasks in D state and their stacks, the load; a log that stops growing
    while qemu burns CPU means the guest no longer runs user space."""
    fd = -1
    with contextlib.suppress(OSError):
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(fd, 0, os.SEEK_END)
    os.sched_setaffinity(0, {spec.SENDER_CPU})  # this thread too: vCPU 1 is the router's
    with open(shared / "watch.log", "a") as log:
        while not stop.wait(every):
            lines = [f"t={time.monotonic():.1f} load={Path('/proc/loadavg').read_text().split()[:3]}"]
            while fd >= 0:
                try:
                    rec = os.read(fd, 8192).decode(errors="replace")
                except BlockingIOError:
                    break
                except OSError:  # EPIPE: records overwritten meanwhile
                    continue
                head, _, msg = rec.partition(";")
                with contextlib.suppress(ValueError):
                    if int(head.split(",")[0]) & 7 <= 4:
                        lines.append("kmsg: " + msg.strip())
            lines += ["D: " + t for t in _d_state_tasks()]
            lines += ["task: " + t for t in _watched_tasks()]
            with contextlib.suppress(OSError):
                lines += ["softnet: " + " ".join(x.split()[0] + "/" + x.split()[1] + "/" + x.split()[2]
                                                 for x in Path("/proc/net/softnet_stat").read_text().splitlines())]
            log.write("\n".join(lines) + "\n")
            log.flush()
            os.fsync(log.fileno())


def _built() -> dict[str, Path]:
    """The helpers bench/tools.build() compiled on the host (the repository
    is read-only in the guest)."""
    from bench import tools
    out = {"blast": tools.OUT / "blast", "offload": tools.ROOT / "build" / "offload.bpf.o"}
    for name in ("count", "ceiling", "ceiling_tc", "wire", "flood"):
        out[name] = tools.OUT / f"{name}.bpf.o"
    missing = [str(p) for p in out.values() if not p.exists()]
    if missing:
        raise RuntimeError(f"not built on the host: {missing}")
    return out


# -- counters ------------------------------------------------------------------------------
def proc_net_dev(ns: str) -> dict[str, dict[str, int]]:
    """/proc/net/dev of namespace ``ns``, read in-process (setns on this thread:
    no `ip netns exec`, which costs 0.1-3 s a call under emulation)."""
    from tests.kernel_lane.topology import in_netns
    with in_netns(ns), open("/proc/thread-self/net/dev") as f:
        text = f.read()
    return parse_net_dev(text)


def parse_net_dev(text: str) -> dict[str, dict[str, int]]:
    out = {}
    for line in text.splitlines()[2:]:
        name, _, rest = line.partition(":")
        v = [int(x) for x in rest.split()]
        if len(v) >= 16:
            out[name.strip()] = {"rx_bytes": v[0], "rx_packets": v[1], "rx_dropped": v[3],
                                 "tx_bytes": v[8], "tx_packets": v[9], "tx_dropped": v[11]}
    return out


def router_counters(topo: Any, port: str) -> dict[str, int]:
    dev = proc_net_dev(topo.router.name)
    lan, wan = dev[port], dev["wan0"]
    return {"lan_rx": lan["rx_packets"], "lan_rx_dropped": lan["rx_dropped"],
            "wan_tx": wan["tx_packets"], "wan_tx_dropped": wan["tx_dropped"],
            "wan_tx_bytes": wan["tx_bytes"]}


def parse_ethtool_stats(text: str) -> dict[str, int]:
    """`ethtool -S` of a veth, its per-queue XDP counters summed over queues
    (``rx_queue_0_xdp_drops`` -> ``xdp_drops``)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.strip().partition(":")
        m = re.fullmatch(r"(?:rx|tx)_queue_\d+_(\w+)", name)
        if m and value.strip().isdigit():
            out[m.group(1)] = out.get(m.group(1), 0) + int(value)
    return out


def xdp_counters(topo: Any, port: str) -> dict[str, int]:
    """Evidence of what XDP did with the burst: frames it redirected and
    dropped at the port, frames it sent into wan0 and the WAN host's full
    ring refused (the latter also in wan0's tx_dropped)."""
    r = topo.router
    lan = parse_ethtool_stats(r.sh(f"ethtool -S {port}", check=False).stdout)
    wan = parse_ethtool_stats(r.sh("ethtool -S wan0", check=False).stdout)
    return {"port_xdp_drops": lan.get("xdp_drops", 0), "port_xdp_redirect": lan.get("xdp_redirect", 0),
            "wan_xdp_xmit": wan.get("xdp_xmit", 0), "wan_xdp_xmit_errors": wan.get("xdp_xmit_errors", 0)}


def inproc_status(topo: Any, check: bool = True, limit: int = 0) -> dict[str, Any] | None:
    """Topology.status() without a Python start per call (2 s and more under
    emulation): the agent's control socket asked from this thread, set into
    the router's namespace."""
    from offloader import control
    from offloader.errors import OffloadError
    from tests.kernel_lane.topology import in_netns
    with in_netns(topo.router.name):
        try:
            return control.request("status", timeout=15.0, **({"limit": limit} if limit else {}))
        except (OSError, OffloadError, ValueError):
            if check:
                raise
            return None


def conntrack_offloaded(topo: Any, proto: str, port_opt: str) -> tuple[bool, str]:
    out = topo.router.sh(f"conntrack -L -p {proto} {port_opt} 2>/dev/null", check=False).stdout
    return "[OFFLOAD]" in out, out.strip()[:600]


# -- the measured flow ------------------------------------------------------------------------
def measured_flow(src: Feed, sport: int) -> dict[str, Any]:
    """The UDP burst's flow as the agent's status names a flow map entry:
    the sender's tuple, into the router's port (the WAN host's reply is a
    second entry, in at wan0, and must not stand in for it)."""
    from bench.run import UDP_DPORT
    from offloader.lab import WAN_4
    return {"proto": "udp", "src": src.src, "dst": WAN_4, "sport": sport, "dport": UDP_DPORT,
            "in_dev": src.port}


def flow_verdict(flows: list[dict[str, Any]], want: dict[str, Any]) -> str:
    """What the map holds for exactly ``want``: 'offloaded' or 'passed' (a
    flow map entry and its state), 'pending' (only in the pending map),
    'missing'. A tuple can be in both maps (the pending LRU keeps it after
    the verdict): the flow map's entry wins."""
    states = {f.get("state") for f in flows if all(f.get(k) == v for k, v in want.items())}
    return next((s for s in ("offloaded", "passed", "pending") if s in states), "missing")


def wait_flow_offloaded(status: Any, want: dict[str, Any], timeout: float,
                        clock: Any = time.monotonic, sleep: Any = time.sleep) -> dict[str, Any]:
    """Poll ``status()`` until the flow map holds ``want`` offloaded, at most
    ``timeout`` seconds; raise if it does not (a burst measured on a pending
    flow measures the kernel's path, not the hook). Returns the verdict,
    the seconds waited and the status of that moment."""
    t0 = clock()
    while True:
        st = status()
        verdict = flow_verdict(st.get("flows", []), want)
        waited = clock() - t0
        if verdict == "offloaded":
            return {"verdict": verdict, "waited_s": round(waited, 2), "status": st}
        if waited >= timeout:
            raise RuntimeError(f"the measured flow {want} is {verdict} in the agent's maps "
                               f"after {waited:.0f} s")
        sleep(0.2)


def counter_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The datapath's counters over one burst, the ones that moved."""
    return {k: v - before.get(k, 0) for k, v in after.items()
            if isinstance(v, int) and v != before.get(k, 0)}


# -- the modes ------------------------------------------------------------------------------
NFT_FLOWTABLE = """
add flowtable inet lab ft { hook ingress priority 0; devices = { %s }; }
insert rule inet lab forward meta l4proto { tcp, udp } flow add @ft
"""


def flowtable_rules(port: str) -> str:
    """The flowtable on every router port the lab's flows use, the sender's included."""
    return NFT_FLOWTABLE % ", ".join(dict.fromkeys(("lan1p", "lan2p", port, "wan0")))


def nft_flowtable_on(topo: Any, port: str) -> None:
    topo.router.sh("nft -f -", input=flowtable_rules(port))


def nft_flowtable_off(topo: Any) -> None:
    out = topo.router.sh("nft -a list chain inet lab forward", check=False).stdout
    for m in re.finditer(r"flow add @ft # handle (\d+)", out):
        topo.router.sh(f"nft delete rule inet lab forward handle {m.group(1)}", check=False)
    topo.router.sh("nft delete flowtable inet lab ft", check=False)


def udp_reply(topo: Any, bins: dict[str, Path], sport: int) -> None:
    """One datagram back from the WAN host to the masqueraded flow, so that
    conntrack has seen both directions (what a real UDP flow does, and what
    nf_flow_table's `flow add` waits for)."""
    from bench.run import UDP_DPORT
    from offloader.lab import ROUTER_WAN4, WAN_4
    topo.wan.sh(f"{bins['blast']} {WAN_4} {ROUTER_WAN4} {sport} {UDP_DPORT} 1 10 1 2", timeout=20)


LIVE_RATE = 1_000_000  # live frames offered per second: more than any mode takes under emulation


def live_frames(topo: Any, bins: dict[str, Path], src: Feed) -> Any:
    """The UDP burst as bench/flood.py's live XDP frames (``flood_same``: one
    tuple, 64 bytes on the wire, UDP checksum 0) transmitted out of the
    NIC-like sender's eth0 into the wire, so no skb exists anywhere before the
    router: blast.c's sendmmsg through the wire reached 1,400-6,800 packets a
    second here (the sender's skb, copied into the wire's xdp_buff, on the
    vCPU the lab's other work shares), too few to keep the router's NAPI busy.
    Run from this process, its thread set into the sender's namespace: a
    Python start for it took 20 s and more under emulation, long enough for
    the agent to hand the idle flow back before the first frame (an
    unreplied UDP flow lives 30 s in conntrack)."""
    from bench import tools
    from bench.flood import flood
    from bench.run import UDP_DPORT
    from offloader.lab import WAN_4
    from tests.kernel_lane.topology import in_netns
    src_mac = tools.mac_of(src.host, "eth0")
    dst_mac = bytes.fromhex(src.router_mac.replace(":", ""))

    def send(sport: int, seconds: float) -> dict[str, Any]:
        with in_netns(src.host.name):
            d = flood(str(bins["flood"]), "eth0", dst_mac, src.src, WAN_4, LIVE_RATE, seconds,
                      (sport, UDP_DPORT), src_mac=src_mac)
        return {"sent": d["injected"], "seconds": d["seconds"]}
    return send


def udp_test(topo: Any, bins: dict[str, Path], src: Feed, mode: str, seconds: float, count: Any,
             sport: int, prog: Progress, ready: Any = None) -> dict[str, Any]:
    """The bench's router_cost() (the router's LAN-port kthread on CPU 1),
    with the router's own in and out counters around it. ``ready()`` runs
    after the idle sample, just before the burst (our hooks: the measured
    flow offloaded in the map, at that moment)."""
    from bench import run as brun
    from offloader import lab as labmod
    labmod.threaded_napi(topo.wan, "eth0", spec.SENDER_CPU)
    # vCPU 1's background on the host (timers, RCU, kworkers), subtracted there
    prog.at(mode, "vcpu idle")
    time.sleep(spec.IDLE_SAMPLE_S)
    prog.at(mode, "vcpu idle end")
    if ready is not None:
        ready()
    prog.at(mode, "udp measure", sport=sport)
    x0 = xdp_counters(topo, src.port)
    c0 = router_counters(topo, src.port)
    res = brun.router_cost(topo, bins, mode, seconds, count, sport, port=src.port,
                           send=live_frames(topo, bins, src) if src.nic else None)
    prog.at(mode, "udp measured")  # the host's vCPU sample closes the window here
    c1 = router_counters(topo, src.port)
    x1 = xdp_counters(topo, src.port)
    d = {k: c1[k] - c0[k] for k in c0} | {k: x1[k] - x0[k] for k in x0}
    res.update(d)
    # tx_dropped includes what XDP redirected into wan0 and the WAN host's
    # full ring refused (6.1: xdp_xmit_errors 89, tx_dropped 89 in one round)
    res["router_out"] = d["wan_tx"] + d["wan_tx_dropped"]
    res["napi_threads"] = list(res.get("napi_threads", []))
    return res


def tcp_test(topo: Any, src: Feed, mode: str, seconds: float, prog: Progress,
             midway: Any = None) -> dict[str, Any]:
    """The bench's mtu_frames TCP variant: the sender's TSO/GSO/tx checksum
    off, GRO on at the router's port, iperf3 sender -> wan; router CPU from
    the LAN port's kthread, per GB the router sent out of wan0. Measured over
    the second half of the transfer (from iperf's midway call), when the
    flow is offloaded; ``midway`` runs after the first sample."""
    from bench import run as brun
    from offloader import lab as labmod
    if not src.nic:  # the NIC-like sender has them off from the start
        brun.sender_offloads(src.host, False)
        topo.router.sh(f"ethtool -K {src.port} gro on >/dev/null")
    napi = labmod.threaded_napi(topo.router, src.port, spec.ROUTER_CPU)
    labmod.threaded_napi(topo.wan, "eth0", spec.SENDER_CPU)
    prog.at(mode, "tcp start")
    first: dict[str, Any] = {}

    def half_way() -> None:
        # the in-process samples and the marker first: an `ip netns exec` (nft)
        # can take seconds on a loaded host
        first.update(c=router_counters(topo, src.port), k=labmod.thread_cpu_s(napi), t=time.monotonic())
        prog.at(mode, "tcp window")
        if midway is not None:
            midway()
    try:
        # netfilter's count covers the whole transfer (evidence only: an nft call
        # at half-time can outlast the rest of the transfer on a loaded host)
        fwd0 = topo.nft_counter("fwd_established")[0]
        gbps = labmod._iperf(topo, seconds, midway=half_way, client=src.host)
        cpu = labmod.thread_cpu_s(napi) - first["k"]
        wall = time.monotonic() - first["t"]
        prog.at(mode, "tcp measured")
        c1 = router_counters(topo, src.port)
        fwd = topo.nft_counter("fwd_established")[0] - fwd0
    finally:
        labmod.unthread_napi(topo.router, src.port)
        labmod.unthread_napi(topo.wan, "eth0")
    d = {k: c1[k] - first["c"][k] for k in c1}
    return {"gbps": gbps, "seconds": seconds, "window_s": round(wall, 2), "router_cpu_s": cpu,
            "netfilter_packets": fwd, "goodput_bytes": gbps * 1e9 * seconds / 8 / 2,
            "out_bytes": d["wan_tx_bytes"], "out_packets": d["wan_tx"] + d["wan_tx_dropped"],
            "in_packets": d["lan_rx"]}


def run_mode(topo: Any, bins: dict[str, Path], src: Feed, mode: str, rnd: int, cfg: dict[str, Any],
             prog: Progress, rec: dict[str, Any]) -> None:
    """One mode: UDP then TCP, filling ``rec`` as it goes (what was measured
    before a failure is kept)."""
    from bench import run as brun
    from bench import tools
    sport = 41001 + rnd * 20 + spec.MODES.index(mode)
    agent: Any = None
    with contextlib.ExitStack() as stack:
        if mode == "nf_flow_table":
            prog.at(mode, "flowtable on")
            nft_flowtable_on(topo, src.port)
            stack.callback(nft_flowtable_off, topo)
        elif mode == "ceiling":
            tools.xdp_detach(topo.router, src.port)  # nothing of an earlier mode stays
            brun.ceiling_attach(topo, bins["ceiling"], port=src.port)
            stack.callback(tools.xdp_detach, topo.router, src.port)
        elif mode == "ceiling_tc":
            tools.tc_detach(topo.router, src.port)
            brun.ceiling_tc_attach(topo, bins["ceiling_tc"], port=src.port)
            stack.callback(tools.tc_detach, topo.router, src.port)
        elif mode.startswith("offload_"):
            prog.at(mode, "agent start")
            # the agent starts on both vCPUs (Python and the verifier are slow
            # under emulation) and pins itself to vCPU 0 once it answers
            os.sched_setaffinity(0, {spec.SENDER_CPU, spec.ROUTER_CPU})
            try:
                agent = stack.enter_context(brun.Agent(topo, mode.split("_", 1)[1]))
            finally:
                os.sched_setaffinity(0, {spec.SENDER_CPU})
        # UDP: warm the flow up (a few paced packets, one reply), check it is
        # offloaded, then the measured burst.
        count = stack.enter_context(tools.delivery_counter(topo.wan, "eth0", bins["count"]))
        prog.at(mode, "udp warm-up", sport=sport)
        brun.blast(topo, bins["blast"], sport=sport, count=5, rate=50, seconds=2,
                   sender=src.host, src=src.src)
        udp_reply(topo, bins, sport)
        brun.blast(topo, bins["blast"], sport=sport, count=5, rate=50, seconds=2,
                   sender=src.host, src=src.src)
        want = measured_flow(src, sport)
        before: dict[str, Any] = {}
        ready = None
        if agent is not None:
            prog.at(mode, "udp wait offloaded")
            w = wait_flow_offloaded(agent.status, want, cfg["offload_wait"])
            rec["udp_wait_s"] = w["waited_s"]
            rec["udp_offloaded_flows"] = w["status"]["counts"]["offloaded"]

            def ready() -> None:
                # again just before the burst: an idle flow may have been
                # handed back meanwhile (then warmed up and waited for again)
                st = agent.status()
                rec["udp_verdict_before_burst"] = flow_verdict(st["flows"], want)
                if rec["udp_verdict_before_burst"] != "offloaded":
                    brun.blast(topo, bins["blast"], sport=sport, count=5, rate=50, seconds=2,
                               sender=src.host, src=src.src)
                    st = wait_flow_offloaded(agent.status, want, cfg["offload_wait"])["status"]
                before.update(dp=st.get("datapath", {}),
                              torn=(st.get("agent") or {}).get("torn_down", {}))
        elif mode == "nf_flow_table":
            rec["udp_ct_offload"], rec["udp_ct"] = conntrack_offloaded(topo, "udp", f"--sport {sport}")
        rec["udp"] = udp_test(topo, bins, src, mode, cfg["udp_seconds"], count, sport, prog, ready)
        if agent is not None:
            st = agent.status()
            rec["udp_flow_state"] = flow_verdict(st["flows"], want)
            # the datapath's counters since the agent started, and over the
            # burst alone (pending: frames of tuples without a verdict, passed;
            # pass_stale: the fail-safe passed them, the heartbeat stale)
            rec["udp_datapath"] = st.get("datapath", {})
            rec["udp_datapath_burst"] = counter_delta(before.get("dp", {}), rec["udp_datapath"])
            # offloaded flows the agent handed back meanwhile, by reason: the
            # measured flow's packets go to the kernel until it is offloaded again
            rec["udp_torn_down_burst"] = counter_delta(before.get("torn", {}),
                                                       (st.get("agent") or {}).get("torn_down", {}))
        if mode == "nf_flow_table":  # still offloaded after the burst?
            rec["udp_ct_offload_after"] = conntrack_offloaded(topo, "udp", f"--sport {sport}")[0]
        # the counter drops UDP only, but a GSO packet would not fit its XDP
        # (no frags): it goes before the TCP test
        tools.xdp_detach(topo.wan, "eth0")
        if mode in spec.TCP_MODES:
            seen: dict[str, Any] = {}

            def midway() -> None:
                if mode == "nf_flow_table":
                    seen["ct_offload"], seen["ct"] = conntrack_offloaded(topo, "tcp", "--dport 5201")
                if agent is not None:  # during the transfer: a closed flow leaves the status
                    st = agent.status()
                    tcp = [f for f in st["flows"] if f["proto"] == "tcp"]
                    big = max(tcp, key=lambda f: f["bytes"]) if tcp else None
                    seen["offloaded_packets"] = big["packets"] if big else 0
                    seen["flow_state"] = big["state"] if big else "missing"
                    seen["via"] = (big.get("via") or "xdp/tc as hooked") if big else ""
            rec["tcp"] = tcp_test(topo, src, mode, cfg["tcp_seconds"], prog, midway=midway)
            rec["tcp"].update({f"ct_{k}" if k == "ct" else k: v for k, v in seen.items()})
        prog.at(mode, "teardown")


def bench_in_guest(shared: Path) -> None:
    prog = Progress(shared)
    cfg = json.loads(os.environ.get("KERNEL_LANE_BENCH", "{}")) or spec.default_config()
    stop = threading.Event()
    threading.Thread(target=watch, args=(shared, stop), daemon=True).start()
    with contextlib.suppress(OSError):  # hung tasks reported within 30 s, not 120
        Path("/proc/sys/kernel/hung_task_timeout_secs").write_text("30")
    prog.at("setup", "start", uname=os.uname().release, cpus=os.cpu_count())
    from bench import run as brun
    from offloader.lab import lab_network
    brun.Agent.start_timeout = cfg["agent_start"]
    brun.Agent.stop_timeout = 60.0
    bins = _built()
    meta = {"kind": "meta", "uname": os.uname().release, "cpus": os.cpu_count(),
            "cpu": brun.machine()["machine"], "config": cfg}
    # what bpf_ktime_get_ns() reads: under TCG an hpet or acpi_pm read is an
    # emulated device access, a cost a program pays per call and hardware does not
    with contextlib.suppress(OSError):
        meta["clocksource"] = Path("/sys/devices/system/clocksource/clocksource0/"
                                   "current_clocksource").read_text().strip()
    try:
        with deadline(cfg["setup_budget"], prog):
            prog.at("setup", "modprobe")
            # loaded up front: the lab's first `nft -f` would otherwise load them one
            # request_module() at a time, over a minute on a loaded host
            mods = ["nf_tables", "nft_ct", "nft_objref", "nft_chain_nat", "nft_nat", "nft_masq",
                    "nf_flow_table", "nf_flow_table_inet", "nft_flow_offload", "veth", "bridge"]
            p = subprocess.run(["modprobe", "-a", *mods], capture_output=True, text=True, timeout=120)
            meta["modprobe"] = p.stderr.strip()[-500:] or "ok"
            prog.at("setup", "lab up")
            lab = lab_network()
            topo = lab.__enter__()
    except Exception as e:
        meta["setup_error"] = f"{type(e).__name__}: {e}"
        prog.result(meta)
        raise
    sources = contextlib.ExitStack()
    try:
        with deadline(cfg["setup_budget"], prog):
            prog.at("setup", f"sender {cfg.get('sender', 'nic')}")
            src = sources.enter_context(feed(topo, bins, cfg.get("sender", "nic")))
    except Exception as e:
        meta["setup_error"] = f"{type(e).__name__}: {e}"
        prog.result(meta)
        sources.close()
        with deadline(60, prog):
            lab.__exit__(None, None, None)
        raise
    meta["sender"] = {"host": src.host.name, "src": src.src, "port": src.port, "nic": src.nic}
    topo.status = lambda check=True, limit=0: inproc_status(topo, check, limit)
    # From here everything of ours runs on vCPU 0 (children inherit it): vCPU 1
    # is the router's receive kthread alone, which the host's vCPU sample
    # relies on. (The lab came up on both: on one it takes twice as long.)
    os.sched_setaffinity(0, {spec.SENDER_CPU})
    try:
        meta["neighbours"] = topo.router.sh("ip neigh show", check=False).stdout.strip()
        prog.result(meta)
        if cfg.get("warm_up", True):
            with deadline(cfg["setup_budget"], prog):
                warm_up(topo, bins, src, prog)
        for rnd in range(cfg["rounds"]):
            for mode in cfg["modes"]:
                budget = spec.guest_budget(mode, cfg)
                t0 = time.monotonic()
                prog.round = rnd
                prog.at(mode, "begin", budget=budget)
                rec: dict[str, Any] = {"mode": mode, "round": rnd}
                try:
                    with deadline(budget, prog):
                        run_mode(topo, bins, src, mode, rnd, cfg, prog, rec)
                except Exception as e:  # recorded, and the next mode runs
                    rec["error"] = f"{type(e).__name__}: {e}"[:2000]
                    rec["failed_at"] = prog.step
                    prog.at(mode, "failed", error=rec["error"][:300])
                    with deadline(spec.CLEANUP_BUDGET, prog):
                        cleanup(topo, src)
                rec["seconds"] = round(time.monotonic() - t0, 1)
                prog.result(rec)
        prog.at("done", "all modes")
    finally:
        stop.set()
        with deadline(60, prog):
            sources.close()
            lab.__exit__(None, None, None)


def warm_up(topo: Any, bins: dict[str, Path], src: Feed, prog: Progress) -> None:
    """A few paced packets before anything is measured, first with the
    kernel's default receive path, then with the NAPI kthreads as measured:
    a guest that hangs here shows which of the two it is."""
    from bench import run as brun
    from bench import tools
    from offloader import lab as labmod
    with tools.delivery_counter(topo.wan, "eth0", bins["count"]) as count:
        for step in ("softirq", "threaded"):
            if step == "threaded":
                labmod.threaded_napi(topo.router, src.port, spec.ROUTER_CPU)
                labmod.threaded_napi(topo.wan, "eth0", spec.SENDER_CPU)
            prog.at("warm-up", f"5 packets, NAPI {step}")
            d0 = count()
            brun.blast(topo, bins["blast"], sport=40990, count=5, rate=10, seconds=2,
                       sender=src.host, src=src.src)
            time.sleep(0.2)
            prog.at("warm-up", f"NAPI {step} done", delivered=count() - d0)
        labmod.unthread_napi(topo.router, src.port)
        labmod.unthread_napi(topo.wan, "eth0")


def kill_lab_processes(topo: Any) -> None:
    """What a timed-out step left running in the lab's namespaces (a sender
    whose `ip netns exec` parent was killed by a subprocess timeout holds the
    caller's pipe open, and the caller waits for it)."""
    for h in list(topo.hosts):  # with the NIC-like sender and its wire
        pids = subprocess.run(["ip", "netns", "pids", h.name], capture_output=True, text=True,
                              timeout=20).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)


def cleanup(topo: Any, src: Feed) -> None:
    """After a failed mode: nothing of it may run into the next one (an
    agent killed before its own cleanup leaves its programs attached)."""
    from bench import tools
    from offloader import lab as labmod
    with contextlib.suppress(Exception):
        kill_lab_processes(topo)
        for dev in dict.fromkeys(("lan1p", "lan2p", src.port, "wan0")):
            tools.xdp_detach(topo.router, dev)
            tools.tc_detach(topo.router, dev)
        tools.xdp_detach(topo.wan, "eth0")
        nft_flowtable_off(topo)
        labmod.unthread_napi(topo.router, src.port)
        labmod.unthread_napi(topo.wan, "eth0")


def test_lane_bench() -> None:
    if os.environ.get("KERNEL_LANE_GUEST") != "1":
        pytest.skip("runs inside the 6.1 kernel lane only: python -m bench --kernel-lane")
    bench_in_guest(SHARED)
