"""Write docs/benchmarks.md and the plots under docs/img/ from one run's
results (never from typed-in numbers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
IMG = ROOT / "docs" / "img"

MODES = [("slow_path", "kernel slow path (netfilter + masquerade)"),
         ("offload_xdp", "offloaded, XDP"),
         ("offload_tc", "offloaded, TC"),
         ("offload_hybrid", "offloaded, hybrid (XDP, TC for TCP bulk)"),
         ("ceiling", "ceiling (bare XDP MAC rewrite + redirect)"),
         ("ceiling_tc", "TC ceiling (bare clsact MAC rewrite + bpf_redirect)")]

FRAMES = {
    "slow_path": "skbs; with TSO/GSO on the sender, 64 KB GSO packets",
    "offload_xdp": "xdp_buffs built from the sender's skbs (veth); MTU-sized frames only, "
                   "attaching XDP turns TSO off on the sender's veth",
    "offload_tc": "skbs at clsact ingress; GSO packets forwarded whole",
    "offload_hybrid": "as XDP for this UDP test (only TCP bulk flows go to TC)",
    "ceiling": "xdp_buffs, as XDP",
    "ceiling_tc": "skbs, as TC",
}
TCP_MODES = ["slow_path", "offload_xdp", "offload_tc", "offload_hybrid"]
TCP_CEILINGS = ["ceiling", "ceiling_tc"]  # on the router-cost variants only


def _f(v: Any, nd: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _plots(r: dict[str, Any]) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    IMG.mkdir(parents=True, exist_ok=True)
    made = []
    if "router" in r:
        labels = [m for m, _ in MODES if m in r["router"]]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        vals = [r["router"][m]["pps_per_router_cpu_s"] / 1e6 for m in labels]
        ax.bar(labels, vals, color=["#888", "#2a7", "#27a", "#aa2"][:len(labels)])
        ax.set_ylabel("Mpps per router CPU-second")
        ax.set_title("64-byte UDP through the router: packets per CPU-second")
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom")
        fig.tight_layout()
        fig.savefig(IMG / "bench-router-cost.png", dpi=100)
        plt.close(fig)
        made.append("bench-router-cost.png")
    if "tcp" in r:
        t = r["tcp"]
        modes = TCP_MODES
        variants = [v for v in ("default", "mtu_frames", "nic_frames") if f"slow_path_{v}_gbps" in t]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        w = 0.8 / len(variants)
        for j, v in enumerate(variants):
            vals = [t.get(f"{m}_{v}_gbps", 0) for m in modes]
            ax.bar([i + j * w for i in range(len(modes))], vals, w, label=v)
        ax.set_xticks([i + w * (len(variants) - 1) / 2 for i in range(len(modes))], modes)
        ax.set_ylabel("Gbit/s (iperf3)")
        ax.set_title("TCP lan1 -> wan through the router")
        ax.legend()
        fig.tight_layout()
        fig.savefig(IMG / "bench-tcp.png", dpi=100)
        plt.close(fig)
        made.append("bench-tcp.png")
    if "setup" in r:
        s = r["setup"]
        rows = [(f"1000 flows @ {s['rate_per_s']:g}/s", s["latency_ms"])]
        rows += [(f"{int(t['flows'])} @ {int(t['rate'])}/s #{t.get('trial', 1)}", t["latency_ms"])
                 for t in s.get("rate_trials", [])]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for k, color in (("p50", "#2a7"), ("p99", "#27a"), ("max", "#a33")):
            ax.plot([x[0] for x in rows], [x[1].get(k) or 0 for x in rows], "o-", label=k, color=color)
        ax.set_yscale("log")
        ax.set_ylabel("first packet to offloaded, ms")
        ax.set_title("Flow setup latency (agent's own measurement)")
        ax.legend()
        plt.setp(ax.get_xticklabels(), rotation=15)
        fig.tight_layout()
        fig.savefig(IMG / "bench-setup-latency.png", dpi=100)
        plt.close(fig)
        made.append("bench-setup-latency.png")
    return made


NOISE = 0.05  # "within noise" in a goal: five percent either way


def goals(r: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(goal, what this run measured, met) for each goal the issues set
    whose figures this run has; None when a figure is missing."""
    out: list[tuple[str, str, bool | None]] = []

    def ratio(a: str, b: str) -> float | None:
        """a / b as shown (two decimals), so a goal is judged on the figure the table gives."""
        x, y = r.get(a), r.get(b)
        return round(x / y, 2) if x is not None and y else None

    def add(goal: str, value: float | None, text: str, ok: bool | None) -> None:
        out.append((goal, text if value is not None else "not measured",
                    ok if value is not None else None))

    def against_ceiling(key: str, a: str, b: str) -> float | None:
        """The round-by-round ratio (run.paired_ratios' median) where the run has
        it, else the ratio of the median rounds."""
        v = r.get(key)
        return round(v, 2) if v is not None else ratio(a, b)

    x = against_ceiling("offload_xdp_vs_ceiling", "offload_xdp_pps", "ceiling_pps")
    add("XDP offload at the bare XDP ceiling (packets per router CPU-s)", x,
        f"{x or 0:.2f}x the ceiling", x is not None and x >= 1 - NOISE)
    x = against_ceiling("offload_tc_vs_ceiling_tc", "offload_tc_pps", "ceiling_tc_pps")
    add("TC offload at least 0.95x the bare TC ceiling", x, f"{x or 0:.2f}x",
        x is not None and x >= 0.95)
    x = ratio("offload_hybrid_pps", "offload_xdp_pps")
    add("hybrid: 64-byte UDP at least XDP's (within noise)", x, f"{x or 0:.2f}x XDP's",
        x is not None and x >= 1 - NOISE)
    # Router CPU per GB of TCP from two frame sources (bench/wire.py):
    # skbs the sender's stack built (veth: XDP copies each), and frames as
    # from a NIC's ring (no skb before the router, no copy).
    for frames, src in (("", "frames as skbs (veth)"), ("_nic", "frames as from a NIC")):
        x = ratio(f"offload_hybrid_tcp{frames}_cpu_s_per_gb", f"offload_tc_tcp{frames}_cpu_s_per_gb")
        add(f"hybrid: TCP router CPU per GB at most TC's (within noise), {src}", x,
            f"{x or 0:.2f}x TC's", x is not None and x <= 1 + NOISE)
        best = [(r[k], m) for m in ("offload_xdp", "offload_tc", "offload_hybrid")
                if (k := f"{m}_tcp{frames}_cpu_per_gb_vs_slow_path") in r and r[k] is not None]
        b = min(best) if best else None
        # What a bare program of each hook costs on the same frames: the
        # floor below which no offload of that hook can go in this lab.
        floors = [(r[k], m) for m in TCP_CEILINGS
                  if (k := f"{m}_tcp{frames}_cpu_per_gb_vs_slow_path") in r and r[k] is not None]
        floor = ("; the bare ceilings' floor: " + ", ".join(f"{m} {v:.2f}x" for v, m in floors)
                 if floors else "")
        add(f"TCP: router CPU per GB in the best mode at most 0.5x the slow path's, {src}",
            b and b[0], f"{b[0]:.2f}x ({b[1]}){floor}" if b else "", b is not None and b[0] <= 0.5)
    tput = [(r[k], m) for m in ("offload_xdp", "offload_tc", "offload_hybrid")
            if (k := f"{m}_tcp_vs_slow_path") in r and r[k] is not None]
    w = min(tput) if tput else None
    add("TCP throughput with default offloads never below the slow path's", w and w[0],
        ", ".join(f"{m} {v:.2f}x" for v, m in sorted(tput, key=lambda t: t[1])),
        w is not None and w[0] >= 1 - NOISE)
    nic = [(r[k], m) for m in ("offload_xdp", "offload_tc", "offload_hybrid")
           if (k := f"{m}_tcp_nic_vs_slow_path") in r and r[k] is not None]
    if nic:  # not judged: the goal is the senders' default offloads, which no NIC-like sender has
        out.append(("TCP throughput, MTU frames as from a NIC (the same sender in every mode): "
                    "no goal, shown", ", ".join(f"{m} {v:.2f}x" for v, m in sorted(nic, key=lambda t: t[1])),
                    None))
    c, m = r.get("agent_cpu_pct_100k"), r.get("agent_rss_mb_100k")
    add("agent at 100,000 flows: under 5% of a core", c, f"{c or 0:.2f}%", c is not None and c < 5)
    add("agent at 100,000 flows: under 40 MB RSS", m, f"{m or 0:.1f} MB", m is not None and m < 40)
    n = r.get("new_flows_per_s_sustained")
    add("at least 20,000 new flows a second, p99 setup under 5 ms, none lost "
        "(agent on the sender's core, which also forwards the new flows)", n,
        f"{n or 0:,.0f} a second", n is not None and n >= 20000)
    own = r.get("new_flows_per_s_sustained_own_core")
    if own is not None:  # not judged apart: the same goal, the agent placed otherwise (section 4)
        out.append(("the same, agent on a core of its own (the forwarding on the other): shown",
                    f"{own:,.0f} a second", None))
    d = r.get("early_drop_frames_vs_kernel_drop")
    add("early drop at most 0.2x the kernel's drop (frames as from a NIC, hook xdp)", d,
        f"{d or 0:.2f}x", d is not None and d <= 0.2)
    d, floor = r.get("early_drop_vs_kernel_drop"), r.get("drop_floor_xdp_vs_kernel_drop")
    if d is not None:  # not judged: on veth the skb exists before XDP runs (section 6)
        out.append(("early drop, frames as skbs (veth), hook xdp: no goal, shown with its floor",
                    f"{d:.2f}x; a program that only drops: "
                    + (f"{floor:.2f}x" if floor is not None else "not measured"), None))
    return out


def _rate_rows(L: list[str], trials: list[dict[str, Any]]) -> None:
    L.append("| new flows per second | trial | sent per second | flows | offloaded | passed | lost | "
             "p50 ms | p99 ms | max ms | agent us per flow | rate kept up | load average |")
    L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for x in trials:
        la = x["latency_ms"]
        sent = x.get("sent_per_s")
        L.append(f"| {x['rate']:g} | {x.get('trial', 1)} | {'' if sent is None else f'{sent:,}'} | "
                 f"{x['flows']} | {x['offloaded']} | "
                 f"{x.get('passed', 0)} | {x.get('lost', '')} | {_f(la.get('p50'), 3)} | "
                 f"{_f(la.get('p99'), 3)} | {_f(la.get('max'), 3)} | "
                 f"{x.get('agent_us_per_flow', '')} | {x.get('rate_kept_up', x['kept_up'])} | "
                 f"{x.get('loadavg', '')} |")


def write(r: dict[str, Any]) -> Path:
    made = _plots(r)
    L: list[str] = []
    L.append("# Benchmarks\n")
    L.append("Written by `python -m bench` from one run; do not edit by hand. "
             "`python -m bench --quick --json` prints the headline numbers as one JSON object.\n")
    L.append(f"- Machine: {r['machine']}\n- Kernel: {r['kernel']}\n- Date: {r['date']}\n"
             f"- Run took {r.get('bench_seconds')} s{' (quick)' if r.get('quick') else ''}\n"
             f"- Load average at the start and the end: {r.get('loadavg_start', '?')} / "
             f"{r.get('loadavg_end', '?')}\n")
    L.append("What each change saved, where the time goes and the figures of earlier runs are in "
             "[performance.md](performance.md) (written by hand); this page is one run's output.\n")
    met = goals(r)
    if met:
        L.append("## Goals\n")
        L.append("| goal | this run | met |")
        L.append("|---|---|---|")
        for goal, text, ok in met:
            L.append(f"| {goal} | {text} | {'-' if ok is None else 'yes' if ok else '**no**'} |")
        L.append("\nThe lane's comparison with nf_flow_table has its own goal, in its section below.\n")
    L.append("## How it is measured\n")
    L.append(
        "The built-in lab (`offloader/lab.py`): lan1 -- br-lan [router, masquerade out of wan0] -- wan, "
        "all veth. The UDP source (`bench/blast.c`, raw socket + sendmmsg, 64-byte frames, one 5-tuple) is "
        "pinned to CPU 0. The router's receive path runs in the threaded NAPI kthread of its LAN port "
        "(`lan1p`, `threaded=1` in the router namespace), pinned to CPU 1; since every mode's forwarding "
        "(bridge, netfilter, routing, XDP or TC program, transmit into the WAN veth) runs in that thread, "
        "the router's cost is that thread's run time (`/proc/PID/schedstat`). The WAN host's receive path "
        "runs in its own NAPI kthread with an XDP program (`bench/count.bpf.c`) that counts UDP frames and "
        "drops them: delivered packets are counted there. Router cost = delivered packets / router "
        "CPU-seconds. The ceiling is `bench/ceiling.bpf.c`: Ethernet rewrite and devmap redirect, nothing "
        "else. The agent is pinned to CPU 0 and runs without per-flow debug logging.\n")
    L.append("The sender saturates its core before the router does, so raw delivered pps says more about "
             "the sender than the router; the per-CPU-second figure is the comparison. Other work on the "
             "machine during the run shares CPU 1 and lowers delivered pps, not the per-CPU-second cost.\n")
    if "router" in r:
        L.append("## 1. Router cost, 64-byte UDP\n")
        L.append("Each mode ran in three interleaved rounds; the table shows the round with the median "
                 "packets per router CPU-second, and the last column every round's figure.\n")
        L.append("| mode | delivered pps | router CPU s | pps per router CPU-s | ns per packet | vs slow path | "
                 "packets netfilter saw | frames handled | rounds (pps per CPU-s) |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---|---|")
        base = r["router"]["slow_path"]["pps_per_router_cpu_s"]
        for m, label in MODES:
            x = r["router"].get(m)
            if not x:
                continue
            L.append(f"| {label} | {_f(round(x['delivered_pps']))} | {_f(x['router_cpu_s'], 3)} | "
                     f"{_f(round(x['pps_per_router_cpu_s']))} | {_f(x['ns_per_packet'], 0)} | "
                     f"{x['pps_per_router_cpu_s'] / base:.2f}x | {_f(x['netfilter_forwarded'])} | {FRAMES[m]} | "
                     + ", ".join(_f(v) for v in x.get("rounds_pps_per_router_cpu_s", [])) + " |")
        lines = []
        for key, what, ceiling in (("offload_xdp_vs_ceiling", "XDP", "ceiling"),
                                   ("offload_tc_vs_ceiling_tc", "TC", "TC ceiling")):
            if r.get(key) is None:
                continue
            paired = r.get(f"{key}_rounds")
            how = (f"the median of the rounds' ratios, each round's {what} offload against the "
                   f"{ceiling} measured just before it: {', '.join(f'{v:.2f}' for v in paired)}"
                   if paired else "median rounds")
            lines.append(f"{what} offload reaches {r[key] * 100:.0f}% of the {ceiling} ({how}).")
        if lines:
            L.append("\n" + "\n".join(lines))
        for m, label in MODES:
            rounds = (r["router"].get(m) or {}).get("rounds_pps_per_router_cpu_s") or []
            if len(rounds) > 1 and min(rounds) > 0 and max(rounds) / min(rounds) > 1.5:
                L.append(f"\n{label}: the rounds differ by {max(rounds) / min(rounds):.1f}x "
                         f"({', '.join(_f(v) for v in rounds)}). On veth the cost of a packet "
                         "depends on the state the sender's veth is left in by the attach and "
                         "detach of the other modes between rounds (XDP on a veth takes software "
                         "GSO off its peer, and each packet from a peer without XDP headroom is "
                         "copied into a page), so the rounds, not one figure, are the result. "
                         "The hit path below is the program's own cost, free of this effect.")
        L.append("\nOn veth, XDP is fed skbs that the sender built: the driver turns each into an xdp_buff "
                 "(a copy when the headroom is short) and the WAN veth turns the frame back into an skb, so "
                 "XDP (ours and the ceiling) costs more per packet than a TC program, which forwards the "
                 "skb it is given. On a physical NIC the XDP path skips the skb allocation altogether.\n")
        if "bench-router-cost.png" in made:
            L.append("![router cost](img/bench-router-cost.png)\n")
    if "tcp" in r:
        t = r["tcp"]
        L.append("## 2. TCP throughput (iperf3, lan1 -> wan)\n")
        L.append("`default`: the sender's default offloads (TSO, GSO, tx checksum on) for the slow path and TC; "
                 "for XDP the lab's tx checksum off stays, because an XDP redirect into a veth loses "
                 "CHECKSUM_PARTIAL (a physical NIC delivers complete checksums), and attaching XDP turns TSO off "
                 "on the sender's veth anyway (hybrid likewise, since its flows start in XDP). "
                 "`mtu_frames`: the senders' TSO/GSO/tx checksum off, GRO on at the router's LAN port, as "
                 "frames arrive off a real wire; router CPU-seconds per GB come from that variant (the LAN "
                 "port's NAPI kthread, threaded and pinned; with GSO packets from the sender a veth skips "
                 "NAPI, so the default variant has no such figure). `nic_frames`: the same MTU frames from a "
                 "sender whose frames reach the router as XDP frames in its port's NAPI, as a NIC driver "
                 "takes frames from its ring (`bench/wire.py`: a namespace between sender and router "
                 "redirects each frame with `bench/wire.bpf.c`), so neither the sender's skb nor XDP's "
                 "copy is part of the router's cost; the router's port is `lan3p` and the sender "
                 "`nic`. An skb built from an XDP frame carries no receive checksum result, so in this "
                 "variant GRO checks every TCP checksum in software, which a NIC with receive checksum "
                 "offload would spare the slow path, TC and hybrid (docs/performance.md has its share).\n")
        L.append("In every mode the router's egress ports (`wan0` and the LAN port) get a 1,000-packet "
                 "pfifo, as a NIC's queue: a veth without one drops what its peer's full ring refuses, "
                 "which the faster modes hit more than the slow path. In `default` the router's work runs "
                 "in the sender's softirq (a TSO packet skips the port's NAPI), so iperf3's client is "
                 "pinned to the router's CPU and its server to the other, the same in every mode. "
                 "Retransmits are the client's count for the round.\n")
        L.append("Each mode ran in interleaved rounds (three in a full run); the table shows each mode's "
                 "median round, by throughput for `default` and by router CPU per GB for the others, and "
                 "the last column that figure in every round.\n")
        L.append("| mode | variant | Gbit/s | vs slow path | router CPU s per GB | vs slow path | "
                 "packets netfilter saw | packets the offloaded flow counted | retransmits | rounds |")
        L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for v in ("default", "mtu_frames", "nic_frames"):
            b = t.get(f"slow_path_{v}_gbps")
            cb = t.get(f"slow_path_{v}_cpu_s_per_gb")
            for m in TCP_MODES + TCP_CEILINGS:
                g = t.get(f"{m}_{v}_gbps")
                if g is None:
                    continue
                c = t.get(f"{m}_{v}_cpu_s_per_gb") if v != "default" else None
                L.append(f"| {m} | {v} | {g:.2f} | {g / b:.2f}x | {_f(c, 3)} | "
                         f"{_f(c / cb if c and cb else None)}{'x' if c and cb else ''} | "
                         f"{_f(t.get(f'{m}_{v}_netfilter_packets'))} | "
                         f"{_f(t.get(f'{m}_{v}_offloaded_packets', 'n/a'))} | "
                         f"{_f(t.get(f'{m}_{v}_retransmits'))} | "
                         f"{', '.join(_f(x, 3) for x in t.get(f'{m}_{v}_rounds', []))} |")
        L.append("\nWith skbs from the sender (`mtu_frames`) the hybrid hook cannot show its gain: XDP on "
                 "a veth turns every arriving skb into an xdp_buff (a copy when the sender left too little "
                 "headroom) also for the frames it passes to GRO and TC, so hybrid pays XDP's per-frame cost "
                 "and TC's per-packet cost. With frames as from a NIC (`nic_frames`) passing a frame costs "
                 "one lookup, and XDP forwards each frame without any skb.")
        if any(f"{m}_mtu_frames_gbps" in t or f"{m}_nic_frames_gbps" in t for m in TCP_CEILINGS):
            L.append("\nThe two ceilings (`ceiling`: `bench/ceiling.bpf.c` in XDP, `ceiling_tc`: "
                     "`bench/ceiling_tc.bpf.c` at clsact ingress) forward the data direction from the "
                     "router's port to the WAN host with nothing but an Ethernet rewrite: no lookup, no "
                     "NAT, no conntrack (the WAN host routes its ACKs to the LAN through the router's "
                     "kernel for the round). What they cost per GB is the least any program of that "
                     "hook can cost on those frames here, so a goal below a ceiling's ratio cannot be "
                     "met by that hook in this lab. With GRO at the router the slow path runs netfilter "
                     "and the routing once per merged packet of up to 64 KB: per GB, its cost is mostly "
                     "receiving the frames and building and merging their skbs, which a TC program "
                     "pays as well, and only XDP on frames without an skb (`nic_frames`) avoids.")
        if "bench-tcp.png" in made:
            L.append("\n![tcp](img/bench-tcp.png)\n")
    if "hit_path" in r:
        h = r["hit_path"]
        L.append("## 3. Hit path (BPF_PROG_TEST_RUN)\n")
        if "results" in h:
            meta = h["meta"]
            L.append("Cost of one offloaded packet in the program itself, ns (`python -m bench.hitpath`). "
                     "`chain`: BPF_PROG_TEST_RUN with repeat, the TTL allowing 254 runs per call, "
                     f"{h['results'][0]['chain_packets']:,} packets per row; `single`: mean of one-run "
                     "calls (fastest 90%) minus the timer's own overhead "
                     + ", ".join(f"{k} {v:.1f} ns" for k, v in meta["timer_overhead_ns"].items())
                     + ". TC cannot chain where its output no longer parses as its input.\n")
            L.append("| case | hook | ingress > egress | chain ns | single ns |")
            L.append("|---|---|---|---:|---:|")
            for x in h["results"]:
                chain = "-" if x["chain_ns"] is None else f"{x['chain_ns']:.1f}"
                single = "-" if x["single_ns"] is None else f"{x['single_ns']:.1f}"
                L.append(f"| {x['case']} | {x['hook']} | {x['ingress']} > {x['egress']} | {chain} | {single} |")
            L.append("")
        else:
            L.append("```\n" + json.dumps(h, indent=1, default=str) + "\n```\n")
    if "setup" in r:
        s = r["setup"]
        lat = s["latency_ms"]
        L.append("## 4. Flow setup latency\n")
        L.append(f"{s['flows']} new UDP flows (one source port each) from lan1 at {s['rate_per_s']:g} per second; "
                 f"{s['offloaded']} offloaded. First packet seen by the datapath to offloaded, as the agent "
                 f"measures it: p50 {_f(lat.get('p50'), 3)} ms, p99 {_f(lat.get('p99'), 3)} ms, max "
                 f"{_f(lat.get('max'), 3)} ms (n = {lat.get('n')}).\n")
        if s.get("rate_trials"):
            L.append("Rate trials: two seconds of new flows at each rate, a fresh agent each, "
                     "several trials a rate. A flow is lost when, 2 s after the last was sent, it is "
                     "neither offloaded nor passed for a reason the agent counts. A rate is kept up "
                     "when no trial lost a flow and the median of its trials' p99 is under 5 ms. "
                     "First with the agent on the sender's core, where the router's forwarding of "
                     "the new flows (conntrack, NAT, the events) runs in the sender's softirq, as "
                     "the bench places the agent everywhere else:\n")
            _rate_rows(L, s["rate_trials"])
            L.append(f"\nHighest sustained new-flow rate (none lost, p99 < 5 ms): "
                     f"{s['sustained_rate_per_s']:g} per second.\n")
        if s.get("rate_trials_own_core"):
            L.append("Then with the agent alone on the other core (sender and forwarding unchanged), "
                     "as on a router whose receive work runs on another core than the agent:\n")
            _rate_rows(L, s["rate_trials_own_core"])
            L.append(f"\nHighest sustained new-flow rate, agent on a core of its own: "
                     f"{s['sustained_rate_per_s_own_core']:g} per second.\n")
        if "bench-setup-latency.png" in made:
            L.append("![setup latency](img/bench-setup-latency.png)\n")
    if "agent" in r:
        L.append("## 5. Agent cost\n")
        L.append("UDP flows created from lan1 a chunk at a time (each chunk once the agent has "
                 "offloaded the flows so far), then each carrying a packet about every 2 s (so the agent "
                 "refreshes their conntrack timeouts), measured over the window below; conntrack "
                 "refreshes are those sent in the window.\n")
        L.append("A row whose flows were not all offloaded when the window began measures a backlog, "
                 "not the steady state. Each size starts from an empty conntrack table (`conntrack -F` "
                 "in the router namespace before its agent starts; the flushed column says how many "
                 "entries the earlier trials had left): entries expiring in the window would make the "
                 "agent read DESTROY events of connections it never offloaded. Overflows and reconciles "
                 "are the conntrack event socket's in the window.\n")
        L.append("| flows | offloaded at start | still offloaded at end | CPU share of one core | RSS MB | "
                 "RSS idle MB | window s | conntrack refreshes | created in s | conntrack flushed | "
                 "conntrack at start | overflows | reconciles | load average |")
        L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for x in r["agent"]:
            L.append(f"| {x['flows']:,} | {x.get('offloaded_at_start', 0):,} | {x['offloaded']:,} | "
                     f"{x['cpu_share'] * 100:.2f}% | {x['rss_mb']:.1f} | "
                     f"{x['rss_idle_mb']:.1f} | {x['window_s']} | {x['conntrack_refreshes']:,} | "
                     f"{x.get('create_s', '')} | {_f(x.get('conntrack_entries_flushed'))} | "
                     f"{_f(x.get('conntrack_entries_at_start'))} | {_f(x.get('event_overflows'))} | "
                     f"{_f(x.get('reconciles'))} | {x.get('loadavg', '')} |")
        L.append("")
    if "drop" in r:
        from bench.drop import report_lines
        L.extend(report_lines(r["drop"], r.get("drop_frames")))
    # the 6.1 lane's comparison (python -m bench --kernel-lane) is its own run: kept
    from bench.lane import extract_section
    lane = extract_section(DOC.read_text()) if DOC.exists() else ""
    if lane:
        L.append(lane.rstrip("\n") + "\n")
    L.append("## Raw results\n")
    L.append("```json\n" + json.dumps(r, indent=1, default=str) + "\n```\n")
    DOC.write_text("\n".join(L) + "\n")
    return DOC
