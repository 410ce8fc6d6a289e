"""The lane benchmark's pure parts (bench/lane.py, bench/lane_guest.py): the guest's
JSON lines, the host's per-mode deadline, the figures and ratios, the docs section.
No boot, no root."""

from __future__ import annotations

from bench import lane
from bench.lane_guest import parse_net_dev


def _udp(out: int, cpu: float, delivered: int | None = None, dropped: int = 0) -> dict:
    return {"router_out": out, "router_cpu_s": cpu, "delivered": out if delivered is None else delivered,
            "wall_s": 3.0, "wan_tx_dropped": dropped, "sent": out, "lan_rx": out,
            "netfilter_forwarded": 0}


def _tcp(out_bytes: float, cpu: float) -> dict:
    return {"router_cpu_s": cpu, "out_bytes": out_bytes, "goodput_bytes": out_bytes * 0.95,
            "gbps": 0.2, "netfilter_packets": 3}


def test_parse_jsonl_skips_a_line_cut_short():
    text = '{"mode": "a"}\n\n[1, 2]\n{"mode": "b", "x": 1}\n{"mode": "c", "x'
    assert lane.parse_jsonl(text) == [{"mode": "a"}, {"mode": "b", "x": 1}]


def test_parse_net_dev():
    text = ("Inter-|   Receive                                                |  Transmit\n"
            " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs "
            "drop fifo colls carrier compressed\n"
            "  wan0: 1000 10 0 2 0 0 0 0 64000 1000 0 7 0 0 0 0\n"
            " lan1p: 5 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n")
    dev = parse_net_dev(text)
    assert dev["wan0"] == {"rx_bytes": 1000, "rx_packets": 10, "rx_dropped": 2, "tx_bytes": 64000,
                           "tx_packets": 1000, "tx_dropped": 7}
    assert set(dev) == {"wan0", "lan1p"}


def test_udp_figures_count_what_the_router_sent():
    f = lane.udp_figures(_udp(out=90_000, cpu=1.5, delivered=60_000, dropped=30_000))
    assert f["pps_per_cpu_s"] == 60_000  # out of wan0, not what arrived
    assert f["delivered_per_cpu_s"] == 40_000
    assert round(f["ns_per_packet"]) == round(1.5e9 / 90_000)
    assert round(f["wan_refused_share"], 3) == 0.333
    assert lane.udp_figures(_udp(out=0, cpu=0.0))["pps_per_cpu_s"] is None


def _records() -> list[dict]:
    return [
        {"kind": "meta", "uname": "6.1.0-56-amd64"},
        {"mode": "slow_path", "round": 0, "udp": _udp(50_000, 1.0), "tcp": _tcp(1e9, 4.0)},
        {"mode": "nf_flow_table", "round": 0, "udp": _udp(80_000, 1.0), "tcp": _tcp(1e9, 2.0)},
        {"mode": "nf_flow_table", "round": 1, "udp": _udp(100_000, 1.0), "tcp": _tcp(1e9, 3.0)},
        {"mode": "offload_tc", "round": 0, "udp": _udp(150_000, 1.0), "tcp": _tcp(2e9, 2.0)},
        {"mode": "offload_xdp", "round": 0, "udp": _udp(60_000, 1.0)},
        {"mode": "offload_hybrid", "round": 0, "error": "ModeTimeout: at agent start",
         "failed_at": "agent start"},
        {"mode": "ceiling", "round": 0, "udp": _udp(70_000, 1.0), "error": "ModeTimeout", "failed_at": "x"},
    ]


def test_summarize_ratios_and_goal():
    s = lane.summarize(_records())
    m = s["modes"]
    assert m["nf_flow_table"]["pps_per_cpu_s"] == 90_000  # median of two rounds
    assert m["nf_flow_table"]["rounds_pps_per_cpu_s"] == [80_000, 100_000]
    assert round(m["offload_tc"]["pps_vs_nf_flow_table"], 3) == round(150 / 90, 3)
    assert m["offload_tc"]["pps_vs_slow_path"] == 3.0
    # CPU per GB: lower is better, the ratio is ours over theirs
    assert m["nf_flow_table"]["tcp_cpu_s_per_gb"] == 2.5
    assert m["offload_tc"]["tcp_cpu_s_per_gb"] == 1.0
    assert m["offload_tc"]["cpu_per_gb_vs_nf_flow_table"] == 0.4
    assert m["offload_xdp"]["tcp_cpu_s_per_gb"] is None
    assert s["best_hook"] == "offload_tc" and round(s["best_vs_nf_flow_table"], 2) == 1.67
    assert s["goal_met"] is True
    # a failed mode is reported with where it failed; a partial one keeps its UDP figure
    assert m["offload_hybrid"]["rounds"] == [] and "agent start" in m["offload_hybrid"]["errors"][0]
    assert m["ceiling"]["pps_per_cpu_s"] == 70_000 and m["ceiling"]["errors"]


def test_goal_not_met_and_not_measured():
    recs = [r for r in _records() if r.get("mode") != "offload_tc"]
    s = lane.summarize(recs)
    assert s["best_hook"] == "offload_xdp" and s["goal_met"] is False
    assert "not met" in lane.verdict_line(s)
    s = lane.summarize([r for r in recs if r.get("mode") != "nf_flow_table"])
    assert "best_hook" not in s and "not measured" in lane.verdict_line(s)


def test_report_first_line_is_the_emulation_caveat():
    s = lane.summarize(_records())
    text = lane.report_text(s, {"uname": "6.1.0-56-amd64"}, "boot 20 s")
    first = text.splitlines()[0]
    assert "software emulation" in first and "ratios are indicative only" in first
    assert "| ours, TC | 150,000 |" in text and "failed:" in text


def test_doc_section_splices_only_its_own_section():
    s = lane.summarize(_records())
    sec = lane.doc_section(s, {"uname": "6.1", "cpus": 2, "config": {"rounds": 1}},
                           {"machine": "m", "kernel": "6.18", "date": "d"}, "boot 20 s")
    assert sec.startswith(lane.SECTION + "\n") and "software emulation" in sec.splitlines()[2]
    doc = "# Benchmarks\n\n## 1. Router cost\n\nx\n\n## Raw results\n\n```json\n{}\n```\n"
    once = lane.splice_section(doc, sec)
    assert once.index(lane.SECTION) < once.index("## Raw results")
    assert once.replace(sec + "\n", "") == doc
    # again with a new run: replaced, not added twice; the rest untouched
    twice = lane.splice_section(once, sec.replace("boot 20 s", "boot 30 s"))
    assert twice.count(lane.SECTION) == 1 and "boot 30 s" in twice and "boot 20 s" not in twice
    assert twice.startswith("# Benchmarks\n\n## 1. Router cost\n\nx\n") and twice.endswith("{}\n```\n")
    assert lane.extract_section(twice).startswith(lane.SECTION)
    # at the end of a document without raw results, and replaced there
    tail = lane.splice_section("# B\n", sec)
    assert tail.endswith(sec.rstrip("\n") + "\n")
    assert lane.splice_section(tail, sec) == tail


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_watchdog_deadline_per_mode():
    cfg = lane.default_config(quick=True)
    clock = _Clock()
    wd = lane.ModeWatchdog(cfg, boot_budget=100, clock=clock)
    assert wd.check([], elapsed=50) is None
    assert "no progress" in (wd.check([], elapsed=101) or "")
    prog = [{"mode": "setup", "step": "lab up"}]
    assert wd.check(prog, 0) is None
    prog.append({"mode": "slow_path", "step": "begin", "round": 0})
    clock.t = 10
    assert wd.check(prog, 10) is None  # a new mode starts its own clock
    prog.append({"mode": "slow_path", "step": "udp measure"})
    budget = lane.guest_budget("slow_path", cfg) + lane.HOST_SLACK
    clock.t = 10 + budget - 1
    assert wd.check(prog, clock.t) is None
    clock.t = 10 + budget + 1
    why = wd.check(prog, clock.t) or ""
    assert "slow_path" in why and "udp measure" in why
    # a failure starts the cleanup's own deadline
    prog.append({"mode": "slow_path", "step": "failed"})
    assert wd.check(prog, clock.t) is None
    clock.t += lane.CLEANUP_BUDGET + lane.HOST_SLACK + 1
    assert "failed" in (wd.check(prog, clock.t) or "")
    # the next round of the same mode is a new deadline
    prog.append({"mode": "slow_path", "step": "begin", "round": 1})
    assert wd.check(prog, clock.t) is None
    prog.append({"mode": "done", "step": "all modes"})
    clock.t += 10 * budget
    assert wd.check(prog, clock.t) is None


def test_guest_budget_covers_an_agent_start():
    cfg = lane.default_config()
    assert lane.guest_budget("offload_tc", cfg) > lane.guest_budget("slow_path", cfg) + cfg["agent_start"]
    assert lane.guest_budget("ceiling", cfg) < lane.guest_budget("slow_path", cfg)  # no TCP test


def test_vcpu_windows_from_the_host_samples():
    def smp(mode, rnd, step, v1, t):
        return {"mode": mode, "round": rnd, "step": step, "host_t": t, "vcpu": [9.0, v1]}
    samples = [smp("setup", None, "lab up", 1.0, 0),
               # background 0.1 s of vCPU per host second, measured over 3 s idle
               smp("slow_path", 0, "vcpu idle", 1.7, 7.0),
               smp("slow_path", 0, "udp measure", 2.0, 10.0), smp("slow_path", 0, "udp measured", 3.5, 15.0),
               smp("slow_path", 0, "tcp start", 3.6, 16.0), smp("slow_path", 0, "tcp window", 4.0, 17.0),
               smp("slow_path", 0, "tcp measured", 6.0, 27.0),
               smp("ceiling", 0, "udp measure", 7.0, 30.0),  # never closed, no idle: no window
               {"mode": "offload_tc", "round": 0, "step": "udp measure", "vcpu": None},
               {"mode": "offload_tc", "round": 0, "step": "udp measured", "vcpu": None}]
    w = {k: round(v, 6) for k, v in lane.vcpu_windows(samples).items()}
    assert w == {("slow_path", 0, "udp"): 1.0, ("slow_path", 0, "tcp"): 1.0}
    recs = [{"mode": "slow_path", "round": 0, "udp": _udp(30_000, 1.0), "tcp": _tcp(1e9, 4.0)},
            {"mode": "ceiling", "round": 0, "udp": _udp(30_000, 1.0)}]
    lane.merge_vcpu(recs, w)
    assert recs[0]["udp"]["vcpu1_host_s"] == 1.0 and "vcpu1_host_s" not in recs[1]["udp"]
    assert lane.udp_figures(recs[0]["udp"])["pps_per_vcpu1_s"] == 30_000
    assert lane.tcp_figures(recs[0]["tcp"])["vcpu1_s_per_gb"] == 1.0
    assert lane.udp_figures(recs[1]["udp"])["pps_per_vcpu1_s"] is None
    # without an idle sample the raw window counts
    raw = lane.vcpu_windows([smp("m", 0, "udp measure", 1.0, 0.0), smp("m", 0, "udp measured", 2.5, 5.0)])
    assert raw == {("m", 0, "udp"): 1.5}


def test_watchdog_samples_each_progress_line_once(tmp_path):
    wd = lane.ModeWatchdog(lane.default_config(), clock=_Clock())
    (tmp_path / "progress.jsonl").write_text('{"mode": "setup", "round": null, "step": "start"}\n')
    assert wd(tmp_path, 1.0) is None
    with open(tmp_path / "progress.jsonl", "a") as f:
        f.write('{"mode": "slow_path", "round": 0, "step": "begin"}\n{"mode": "slow_pa')
    assert wd(tmp_path, 2.0) is None
    assert [(x["mode"], x["step"]) for x in wd.samples] == [("setup", "start"), ("slow_path", "begin")]
    assert wd.samples[0]["vcpu"] is None  # no qemu of this directory here


def test_a_full_bench_rewrite_keeps_the_lane_section(tmp_path, monkeypatch):
    from bench import report
    doc = tmp_path / "benchmarks.md"
    sec = lane.SECTION + "\n\nratios here\n"
    doc.write_text("# Benchmarks\n\nold\n\n" + sec + "\n## Raw results\n\n{}\n")
    monkeypatch.setattr(report, "DOC", doc)
    monkeypatch.setattr(report, "_plots", lambda r: [])
    report.write({"machine": "m", "kernel": "k", "date": "d"})
    text = doc.read_text()
    assert "old" not in text and text.count(lane.SECTION) == 1 and "ratios here" in text
    assert text.index(lane.SECTION) < text.index("## Raw results")


def test_the_default_run_feeds_nic_frames_in_interleaved_rounds():
    cfg = lane.default_config()
    assert cfg["sender"] == "nic" and cfg["rounds"] == 3
    assert cfg["modes"] == list(lane.DEFAULT_MODES) and "ceiling" not in cfg["modes"]
    assert lane.default_config(quick=True)["rounds"] == 1
    assert lane.default_config(sender="veth")["sender"] == "veth"
    assert set(lane.FRAMES["nic"]) == set(lane.FRAMES["veth"]) == set(lane.MODES)


def test_the_flowtable_covers_the_senders_port():
    from bench.lane_guest import flowtable_rules
    assert "devices = { lan1p, lan2p, lan3p, wan0 }" in flowtable_rules("lan3p")
    assert "devices = { lan1p, lan2p, wan0 }" in flowtable_rules("lan1p")  # not twice


def test_the_veth_feed_is_lan1_on_lan1p_and_builds_nothing():
    from bench.lane_guest import feed
    from offloader.lab import LAN1_4

    class Topo:
        lan1 = object()  # any attribute use beyond this would fail
    with feed(Topo(), {}, "veth") as src:
        assert (src.host, src.src, src.port, src.nic) == (Topo.lan1, LAN1_4, "lan1p", False)


def _with_sender(recs: list[dict], sender: str) -> list[dict]:
    return [dict(r, config={"sender": sender}) if r.get("kind") == "meta" else r for r in recs]


def test_frames_column_and_doc_text_follow_the_sender():
    nic = lane.summarize(_with_sender(_records(), "nic"))
    assert nic["sender"] == "nic"
    text = "\n".join(lane.table_lines(nic))
    assert lane.FRAMES_NIC["offload_xdp"] in text and lane.FRAMES_VETH["offload_xdp"] not in text
    sec = lane.doc_section(nic, {"uname": "6.1", "config": {"rounds": 3, "sender": "nic"},
                                 "sender": {"port": "lan3p"}}, {"loadavg_start": "1.0 1.0 1.0"}, "")
    assert "bench/wire.py" in sec and "`lan3p`" in sec and "lan3p, wan0" in sec
    assert "understates XDP" not in sec and "1.0 1.0 1.0" in sec
    # a run from before the NIC-like sender has no sender in its config: veth
    old = lane.summarize(_records())
    assert old["sender"] == "veth"
    sec = lane.doc_section(old, {"uname": "6.1", "config": {"rounds": 1}}, {}, "")
    assert "`lan1p`" in sec and "understates XDP" in sec
    assert lane.FRAMES_VETH["offload_xdp"] in sec


def test_spread_line_names_each_modes_rounds():
    s = lane.summarize(_records())
    line = lane.spread_line(s)
    assert "nf_flow_table 1.25" in line  # 100,000 over 80,000
    assert "slow path" not in line  # one round: no spread
    assert "one round per mode" in lane.spread_line(lane.summarize(_records()[:2]))


def test_ethtool_xdp_counters_are_summed_over_queues():
    from bench.lane_guest import parse_ethtool_stats
    text = ("NIC statistics:\n     peer_ifindex: 7\n     rx_queue_0_xdp_drops: 3\n"
            "     rx_queue_1_xdp_drops: 2\n     tx_queue_0_xdp_xmit: 100\n"
            "     tx_queue_0_xdp_xmit_errors: 40\n")
    assert parse_ethtool_stats(text) == {"xdp_drops": 5, "xdp_xmit": 100, "xdp_xmit_errors": 40}
    # evidence only: 6.1's tx_dropped already holds XDP's refused redirects
    u = dict(_udp(out=100, cpu=1.0, delivered=60, dropped=40), wan_xdp_xmit_errors=40)
    assert lane.udp_figures(u)["wan_refused_share"] == 0.4


# -- the measured flow's verdict (bench/lane_guest.py) -----------------------------------------------
WANT = {"proto": "udp", "src": "198.18.1.50", "dst": "198.19.2.2", "sport": 41002, "dport": 9999,
        "in_dev": "lan3p"}
FORWARD = {"family": "ipv4", **WANT}
# the WAN host's reply: the same ports, in at wan0, offloaded first in one run
REPLY = {"family": "ipv4", "proto": "udp", "src": "198.19.2.2", "dst": "198.19.2.1", "sport": 9999,
         "dport": 41002, "in_dev": "wan0", "state": "offloaded"}


def test_measured_flow_names_the_senders_tuple_into_its_port():
    from bench.lane_guest import Feed, measured_flow
    src = Feed(host=None, src="198.18.1.50", port="lan3p", nic=True)
    assert measured_flow(src, 41002) == WANT


def test_flow_verdict_is_the_exact_tuple_not_any_offloaded_flow():
    from bench.lane_guest import flow_verdict
    assert flow_verdict([REPLY], WANT) == "missing"
    assert flow_verdict([REPLY, {**FORWARD, "state": "pending"}], WANT) == "pending"
    # the same tuple from another port is another flow
    assert flow_verdict([{**FORWARD, "in_dev": "lan1p", "state": "offloaded"}], WANT) == "missing"
    # in both maps (the pending LRU keeps the tuple): the flow map's entry counts
    both = [{**FORWARD, "state": "pending"}, {**FORWARD, "state": "offloaded"}]
    assert flow_verdict(both, WANT) == "offloaded"
    assert flow_verdict([{**FORWARD, "state": "passed"}, {**FORWARD, "state": "pending"}], WANT) == "passed"


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def test_wait_returns_once_the_measured_flow_is_offloaded():
    from bench.lane_guest import wait_flow_offloaded
    clock = _Clock()
    answers = iter([[REPLY], [REPLY, {**FORWARD, "state": "pending"}],
                    [REPLY, {**FORWARD, "state": "offloaded"}]])

    def status() -> dict:
        return {"flows": next(answers), "counts": {"offloaded": 2}, "datapath": {"rx": 5}}
    w = wait_flow_offloaded(status, WANT, timeout=10, clock=clock, sleep=clock.sleep)
    assert w["verdict"] == "offloaded" and w["status"]["datapath"] == {"rx": 5}
    assert abs(w["waited_s"] - 0.4) < 1e-9


def test_wait_fails_when_only_other_flows_are_offloaded():
    import pytest

    from bench.lane_guest import wait_flow_offloaded
    clock = _Clock()
    with pytest.raises(RuntimeError, match="pending"):
        wait_flow_offloaded(lambda: {"flows": [REPLY, {**FORWARD, "state": "pending"}]}, WANT,
                            timeout=3, clock=clock, sleep=clock.sleep)
    assert 3 <= clock.t < 3.5


def test_counter_delta_keeps_what_moved_in_the_burst():
    from bench.lane_guest import counter_delta
    before = {"rx": 16, "pending": 1, "redirect": 9, "new": 2}
    after = {"rx": 48106, "pending": 13315, "redirect": 34766, "new": 2, "pass_stale": 0}
    assert counter_delta(before, after) == {"rx": 48090, "pending": 13314, "redirect": 34757}


def test_evidence_names_the_bursts_pending_frames():
    rec = {"mode": "offload_xdp", "round": 0, "udp": _udp(34757, 1.0), "udp_flow_state": "offloaded",
           "udp_wait_s": 0.4, "udp_datapath_burst": {"rx": 48090, "pending": 13314, "redirect": 34757},
           "udp_torn_down_burst": {"neighbour change": 1}, "udp_verdict_before_burst": "missing"}
    text = "\n".join(lane.evidence_lines(lane.summarize([rec])))
    assert "offloaded in the map 0.4 s after the warm-up), missing just before the burst (warmed up again)" in text
    assert "datapath in the burst: 48,090 frames seen, redirect 34,757, pending 13,314" in text
    assert "agent handed flows back in the burst: neighbour change 1" in text


def test_the_idle_sample_ends_before_the_check_that_precedes_the_burst():
    def smp(step, v1, t):
        return {"mode": "offload_xdp", "round": 0, "step": step, "host_t": t, "vcpu": [9.0, v1]}
    # 0.1 s of vCPU per second idle; the check before the burst (a status,
    # maybe a warm-up) is busier and must not count as background
    samples = [smp("vcpu idle", 1.7, 7.0), smp("vcpu idle end", 2.0, 10.0),
               smp("udp measure", 4.0, 12.0), smp("udp measured", 5.5, 17.0)]
    w = {k: round(v, 6) for k, v in lane.vcpu_windows(samples).items()}
    assert w == {("offload_xdp", 0, "udp"): 1.0}
