"""Router CPU per dropped flood packet: the kernel's drop (no agent: the
packet climbs conntrack and the ruleset, a forward rule drops it) against
early drop (the agent learned the tuple; XDP drops it), in one run.

The flood is one repeating tuple from lan1 towards the WAN host, unpaced,
through the router's LAN port, whose receive work (NAPI) runs in its own
kthread pinned to the router CPU: that thread's CPU time over the flood,
divided by the packets the router dropped, is the cost per dropped packet.
A raw-prerouting counter tells how many flood packets the kernel saw.

Two sources. ``skb``: bench/blast.c (a raw socket), so each frame reaches
the router's veth as an skb the sender built, and XDP first turns it into
an xdp_buff. ``frames``: bench/flood.py's live XDP frames (``flood_same``),
which a veth hands to its peer's NAPI without an skb, as a NIC's ring hands
frames to its driver: the kernel's path builds the skb itself, XDP sees the
frame before any skb exists.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from offloader import lab as labmod
from offloader.lab import LAN1_4, WAN_4, Topology

DROP_PORT = 7000
FRAMES_RATE = 4_000_000  # offered live frames per second (the sender's CPU caps it)
Send = Callable[[int, float], dict[str, Any]]  # (source port, seconds) -> {"sent", "seconds"}
MODES = ("kernel_drop", "early_drop", "early_drop_tc", "floor_xdp", "floor_tc")
DROP_RULES = f"""
table inet benchdrop {{
    counter seen {{ }}
    chain raw {{
        type filter hook prerouting priority raw; policy accept;
        udp dport {DROP_PORT} counter name seen
    }}
    chain forward {{
        type filter hook forward priority filter - 5; policy accept;
        udp dport {DROP_PORT} drop
    }}
}}
"""


def _seen(topo: Topology) -> int:
    out = topo.router.sh("nft -j list counter inet benchdrop seen").stdout
    for item in json.loads(out)["nftables"]:
        if "counter" in item:
            return int(item["counter"]["packets"])
    return 0


def _xdp_drops(topo: Topology, dev: str) -> int:
    """Frames the veth's XDP program dropped (ethtool -S: rx_queue_*_xdp_drops)."""
    return sum(v for k, v in topo.router.ethtool_stats(dev).items()
               if k.startswith("rx_queue_") and k.endswith("xdp_drops"))


def sender(topo: Topology, bins: dict[str, Path], run: Any, source: str) -> Send:
    """The flood of ``source`` (``skb`` or ``frames``, see above)."""
    if source == "skb":
        return lambda sport, seconds: run.blast(topo, bins["blast"], sport=sport,
                                                seconds=seconds, dport=DROP_PORT)
    mac = topo.router.sh("cat /sys/class/net/br-lan/address").stdout.strip()

    def frames(sport: int, seconds: float) -> dict[str, Any]:
        out = topo.lan1.sh(f"taskset -c {run.SENDER_CPU} {sys.executable} -m bench.flood "
                           f"{bins['flood']} eth0 {mac} {LAN1_4} {WAN_4} {FRAMES_RATE} "
                           f"{seconds} {sport} {DROP_PORT}", timeout=seconds + 30).stdout
        d = json.loads(out.strip().splitlines()[-1])
        return {"sent": d["injected"], "seconds": d["seconds"]}
    return frames


def _flood_cost(topo: Topology, send: Send, run: Any, mode: str, seconds: float,
                sport: int, lan_port: str, router_cpu: int,
                dropped: Any = None) -> dict[str, Any]:
    """The flood's router CPU over the packets the router dropped: the
    kernel's (raw counter), or what ``dropped()`` counts (the datapath's
    drops, the floor's), not the packets the sender wrote (a veth whose
    queue is full drops frames on the sender's CPU, before the router)."""
    napi = labmod.threaded_napi(topo.router, lan_port, router_cpu)
    count = dropped or (lambda: _seen(topo))
    seen0, n0, c0 = _seen(topo), count(), labmod.thread_cpu_s(napi)
    sent = send(sport, seconds)
    time.sleep(0.2)
    seen1, n1, c1 = _seen(topo), count(), labmod.thread_cpu_s(napi)
    cpu, n = c1 - c0, n1 - n0
    res = {"mode": mode, "sent": sent["sent"], "sent_pps": round(sent["sent"] / sent["seconds"]),
           "router_dropped": n, "router_cpu_s": round(cpu, 4), "kernel_saw": seen1 - seen0,
           "ns_per_packet": round(cpu * 1e9 / n, 1) if n > 0 else None}
    run.log(f"{mode}: {res['sent_pps'] / 1e6:.3f} Mpps sent, {n} dropped by the router, CPU "
            f"{cpu:.2f} s, {res['ns_per_packet']} ns per dropped packet, kernel saw {seen1 - seen0}")
    return res


def measure_drop(topo: Topology, bins: dict[str, Path], run: Any, seconds: float,
                 rounds: int = 3, source: str = "skb") -> dict[str, Any]:
    """Kernel drop and early drop, ``rounds`` interleaved rounds each of
    ``seconds``; the median round per mode, every round's figure kept."""
    send = sender(topo, bins, run, source)
    topo.router.sh("nft -f -", input=DROP_RULES)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    learning: list[dict[str, Any]] = []
    try:
        for rnd in range(rounds):
            sport = (42001 if source == "skb" else 43001) + rnd
            runs["kernel_drop"].append(_flood_cost(topo, send, run, "kernel_drop", seconds,
                                                   sport, run.LAN_PORT, run.ROUTER_CPU))
            for hook, mode, off in (("xdp", "early_drop", 100), ("tc", "early_drop_tc", 200)):
                with run.Agent(topo, hook) as agent:
                    seen0 = _seen(topo)
                    # Learning: the tuple repeats, conntrack never confirms it.
                    sent = run.blast(topo, bins["blast"], sport=sport + off, rate=20000.0,
                                     seconds=2.0, count=20000, dport=DROP_PORT)["sent"]
                    learned = _wait_learned(agent)
                    res = _flood_cost(topo, send, run, mode, seconds, sport + off,
                                      run.LAN_PORT, run.ROUTER_CPU,
                                      lambda a=agent: a.status()["datapath"]["drop_learned"])
                    res["learned"] = learned
                    res["learning_sent"] = sent
                    res["kernel_saw_learning"] = _seen(topo) - seen0 - res["kernel_saw"]
                    res["datapath_drop_learned"] = agent.status()["datapath"].get("drop_learned", 0)
                    runs[mode].append(res)
                    learning.append({"sent": sent + res["sent"],
                                     "kernel_saw": res["kernel_saw_learning"] + res["kernel_saw"]})
            for attach, detach, mode in (
                    (lambda: run.tools.xdp_attach(topo.router, run.LAN_PORT, bins["dropfloor"]),
                     lambda: run.tools.xdp_detach(topo.router, run.LAN_PORT), "floor_xdp"),
                    (lambda: run.tools.tc_attach(topo.router, run.LAN_PORT, bins["dropfloor"]),
                     lambda: run.tools.tc_detach(topo.router, run.LAN_PORT), "floor_tc")):
                attach()
                try:
                    counted = ((lambda: _xdp_drops(topo, run.LAN_PORT)) if mode == "floor_xdp"
                               else (lambda: _tc_drops(topo, run.LAN_PORT)))
                    runs[mode].append(_flood_cost(topo, send, run, mode, seconds, sport + 300,
                                                  run.LAN_PORT, run.ROUTER_CPU, counted))
                finally:
                    detach()
    finally:
        labmod.unthread_napi(topo.router, run.LAN_PORT)
        topo.router.sh("nft delete table inet benchdrop", check=False)
    out: dict[str, Any] = {"source": source}
    for mode, results in runs.items():
        ordered = sorted(results, key=lambda r: r["ns_per_packet"] or 0)
        pick = dict(ordered[len(ordered) // 2])
        pick["rounds_ns_per_packet"] = [r["ns_per_packet"] for r in results]
        out[mode] = pick
    k = out["kernel_drop"]["ns_per_packet"]
    for mode in ("early_drop", "early_drop_tc", "floor_xdp", "floor_tc"):
        e = out[mode]["ns_per_packet"]
        out[f"{mode}_vs_kernel"] = round(e / k, 3) if k and e else None
    total = sum(x["sent"] for x in learning)
    out["kernel_saw_share"] = round(sum(x["kernel_saw"] for x in learning) / total, 5) if total else None
    return out


def _tc_drops(topo: Topology, dev: str) -> int:
    """Packets the clsact ingress filter dropped (tc -s: the qdisc's drops)."""
    out = topo.router.sh(f"tc -s -j qdisc show dev {dev}", check=False).stdout
    return sum(int(q.get("drops", 0)) for q in json.loads(out or "[]") if q.get("kind") == "clsact")


def _wait_learned(agent: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agent.status()["agent"].get("dropped", {}).get("learned"):
            return True
        time.sleep(0.1)
    return False


__all__ = ["measure_drop"]


NAMES = {"kernel_drop": "kernel drop (forward rule, no agent)",
         "early_drop": "early drop, hook xdp", "early_drop_tc": "early drop, hook tc",
         "floor_xdp": "floor: a program that only returns XDP_DROP",
         "floor_tc": "floor: a program that only returns TC_ACT_SHOT"}


def _table(d: dict[str, Any]) -> list[str]:
    lines = ["| mode | ns per dropped packet | vs kernel drop | rounds (ns) | kernel saw |",
             "|---|---:|---:|---|---:|"]
    k = d["kernel_drop"]["ns_per_packet"]
    for mode, label in NAMES.items():
        m = d[mode]
        ratio = f"{m['ns_per_packet'] / k:.2f}x" if k and m["ns_per_packet"] else "-"
        lines.append(f"| {label} | {m['ns_per_packet']} | {ratio} | "
                     f"{', '.join(str(x) for x in m['rounds_ns_per_packet'])} | {m['kernel_saw']} |")
    return lines


def _ratio(d: dict[str, Any], mode: str) -> str:
    k, m = d["kernel_drop"]["ns_per_packet"], d[mode]["ns_per_packet"]
    return f"{m / k:.2f}x" if k and m else "-"


def report_lines(d: dict[str, Any], frames: dict[str, Any] | None = None) -> list[str]:
    """The docs/benchmarks.md section for one run's ``drop`` result (the
    skb source) and, when measured, ``drop_frames`` (the live-frames one)."""
    lines = ["## 6. Early drop: router CPU per dropped flood packet\n",
             "An unpaced 64-byte UDP flood from lan1 on one repeating tuple that a forward rule "
             "drops; router CPU is the LAN port's NAPI kthread, divided by the packets the router "
             "dropped (the kernel's raw-prerouting counter, the datapath's `drop_learned`, the "
             "floor programs' drop counters). Interleaved rounds, the median shown with every "
             "round. The goal is early drop at 0.2x the kernel's drop or less.\n"]
    if frames is not None:
        lines += ["### Frames as from a NIC (live XDP frames, no skb before the router)\n",
                  "The sender injects the frame with `BPF_PROG_TEST_RUN` in live-frames mode "
                  "(`bench/flood.py`, `flood_same`) and transmits it with XDP_TX: the router's "
                  "veth receives an xdp_frame in its NAPI thread, as a driver receives a frame "
                  "from its ring. The kernel's path builds the skb there (as a driver does); XDP "
                  "drops the frame before any skb exists. Frames the veth ring could not take "
                  "are lost on the sender's side and cost the router nothing; the router's "
                  "counters, not the frames offered, are divided.\n",
                  *_table(frames),
                  f"\nEarly drop costs {_ratio(frames, 'early_drop')} of the kernel's drop with "
                  f"hook xdp, {_ratio(frames, 'early_drop_tc')} with hook tc (the skb is built "
                  f"before TC runs); a bare XDP_DROP costs {_ratio(frames, 'floor_xdp')}: the "
                  "rest of early drop's cost is the datapath's parse and its two map lookups "
                  "(flow miss, drop hit).\n",
                  "### Frames as skbs (a raw socket on the sender)\n"]
    lines += _table(d)
    lines.append(f"\nShare of the flood packets the kernel saw with early drop on (learning "
                 f"included, 20,000 packets at 20 kpps then the measured flood): "
                 f"{d['kernel_saw_share'] * 100:.2f}%.\n")
    floor = min(d["floor_xdp"]["ns_per_packet"] or 0, d["floor_tc"]["ns_per_packet"] or 0)
    k = d["kernel_drop"]["ns_per_packet"]
    lines.append(
        f"Here a program that does nothing but drop already costs {floor / k:.2f}x, and early "
        "drop costs about what that floor costs: each frame is an skb before the router's NAPI "
        "thread sees it, and XDP on veth first builds an xdp_buff from it; that delivery work, "
        "not the datapath's map lookups, is what the thread spends. This is the veth "
        "artefact the live-frames table avoids. The kernel's share above is all learning: "
        "none of the measured flood reached it.\n")
    return lines
