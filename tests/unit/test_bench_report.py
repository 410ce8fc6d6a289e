"""The generated benchmark page states each goal against this run's figure."""

from __future__ import annotations

from bench import report, run

# The headline keys of a `python -m bench --quick --json` run (2026-12-01 14:56).
QUICK = {"machine": "m", "kernel": "k", "date": "d", "loadavg_start": "0.50 0.60 0.70",
         "loadavg_end": "1.00 0.90 0.80", "offload_xdp_pps": 848704, "ceiling_pps": 710764,
         "offload_tc_pps": 842570, "ceiling_tc_pps": 813558, "offload_hybrid_pps": 803252,
         "offload_hybrid_tcp_cpu_s_per_gb": 1.7021, "offload_tc_tcp_cpu_s_per_gb": 0.9033,
         "offload_xdp_tcp_cpu_per_gb_vs_slow_path": 1.205,
         "offload_tc_tcp_cpu_per_gb_vs_slow_path": 0.794,
         "offload_hybrid_tcp_cpu_per_gb_vs_slow_path": 1.497,
         "offload_hybrid_tcp_nic_cpu_s_per_gb": 2.0671, "offload_tc_tcp_nic_cpu_s_per_gb": 1.8726,
         "offload_xdp_tcp_nic_cpu_per_gb_vs_slow_path": 0.315,
         "offload_tc_tcp_nic_cpu_per_gb_vs_slow_path": 0.727,
         "offload_hybrid_tcp_nic_cpu_per_gb_vs_slow_path": 0.802,
         "offload_xdp_tcp_nic_vs_slow_path": 1.992, "offload_tc_tcp_nic_vs_slow_path": 1.769,
         "offload_hybrid_tcp_nic_vs_slow_path": 1.497,
         "offload_xdp_tcp_vs_slow_path": 0.482, "offload_tc_tcp_vs_slow_path": 1.03,
         "offload_hybrid_tcp_vs_slow_path": 0.46, "agent_cpu_pct_100k": 11.13,
         "agent_rss_mb_100k": 39.6, "new_flows_per_s_sustained": 10000.0,
         "new_flows_per_s_sustained_own_core": 20000.0,
         "early_drop_frames_vs_kernel_drop": 0.16, "early_drop_vs_kernel_drop": 0.43,
         "drop_floor_xdp_vs_kernel_drop": 0.48}


def written(r: dict, tmp_path, monkeypatch) -> str:
    """The page ``report.write`` makes of ``r``, written under ``tmp_path``, without plots."""
    monkeypatch.setattr(report, "DOC", tmp_path / "benchmarks.md")
    monkeypatch.setattr(report, "_plots", lambda r: [])
    return report.write(r).read_text()


def test_each_goal_is_judged_from_the_runs_own_figures():
    got = {goal: (text, ok) for goal, text, ok in report.goals(QUICK)}
    assert got["TC offload at least 0.95x the bare TC ceiling"] == ("1.04x", True)
    assert got["hybrid: 64-byte UDP at least XDP's (within noise)"] == ("0.95x XDP's", True)
    skb, nic = "frames as skbs (veth)", "frames as from a NIC"
    assert got[f"hybrid: TCP router CPU per GB at most TC's (within noise), {skb}"] == (
        "1.88x TC's", False)
    assert got[f"TCP: router CPU per GB in the best mode at most 0.5x the slow path's, {skb}"] == (
        "0.79x (offload_tc)", False)
    # the same goals judged on the NIC-like frames' own figures (a --quick run, 21:43)
    assert got[f"hybrid: TCP router CPU per GB at most TC's (within noise), {nic}"] == (
        "1.10x TC's", False)
    assert got[f"TCP: router CPU per GB in the best mode at most 0.5x the slow path's, {nic}"] == (
        "0.32x (offload_xdp)", True)
    assert got["TCP throughput, MTU frames as from a NIC (the same sender in every mode): "
               "no goal, shown"] == (
        "offload_hybrid 1.50x, offload_tc 1.77x, offload_xdp 1.99x", None)
    text, ok = got["TCP throughput with default offloads never below the slow path's"]
    assert not ok and "offload_xdp 0.48x" in text and "offload_tc 1.03x" in text
    assert got["agent at 100,000 flows: under 5% of a core"] == ("11.13%", False)
    assert got["agent at 100,000 flows: under 40 MB RSS"] == ("39.6 MB", True)
    assert got["at least 20,000 new flows a second, p99 setup under 5 ms, none lost "
               "(agent on the sender's core, which also forwards the new flows)"] == (
        "10,000 a second", False)
    # the other placement is shown beside it, not judged apart
    assert got["the same, agent on a core of its own (the forwarding on the other): shown"] == (
        "20,000 a second", None)
    assert got["early drop at most 0.2x the kernel's drop (frames as from a NIC, hook xdp)"] == (
        "0.16x", True)
    # skbs on veth: the floor is above the goal, so it is shown, not judged
    assert got["early drop, frames as skbs (veth), hook xdp: no goal, shown with its floor"] == (
        "0.43x; a program that only drops: 0.48x", None)


def test_a_goal_without_its_figure_is_not_measured_rather_than_failed():
    got = {goal: (text, ok) for goal, text, ok in report.goals({"offload_tc_pps": 1})}
    assert got["TC offload at least 0.95x the bare TC ceiling"] == ("not measured", None)
    assert got["agent at 100,000 flows: under 5% of a core"] == ("not measured", None)
    assert got["TCP: router CPU per GB in the best mode at most 0.5x the slow path's, "
               "frames as from a NIC"] == ("not measured", None)


def test_the_page_carries_the_goals_table_and_the_load(tmp_path, monkeypatch):
    text = written(QUICK, tmp_path, monkeypatch)
    assert "| agent at 100,000 flows: under 5% of a core | 11.13% | **no** |" in text
    assert "| agent at 100,000 flows: under 40 MB RSS | 39.6 MB | yes |" in text
    assert "0.50 0.60 0.70 / 1.00 0.90 0.80" in text
    assert "(performance.md)" in text


def test_tcp_reports_each_modes_median_round_and_every_round():
    from bench.run import median_round
    rounds = [{"x_gbps": 5.0, "x_cpu": 1}, {"x_gbps": 2.0, "x_cpu": 2}, {"x_gbps": 4.0, "x_cpu": 3}]
    got = median_round(rounds, "x", "gbps")
    assert got["x_gbps"] == 4.0 and got["x_cpu"] == 3  # the round's own figures, together
    assert got["x_rounds"] == [5.0, 2.0, 4.0]
    # a round without the figure (no GB moved) is never the one reported
    assert median_round([{"x_gbps": None}, {"x_gbps": 3.0}], "x", "gbps")["x_gbps"] == 3.0


def test_the_ceiling_goals_hold_each_round_against_its_own_ceiling():
    # The TC and TC ceiling rounds of the 2026-12-01 22:57 run, in round order.
    router = {"offload_tc": {"rounds_pps_per_router_cpu_s": [686_927, 723_706, 792_552]},
              "ceiling_tc": {"rounds_pps_per_router_cpu_s": [797_798, 894_374, 1_012_974]},
              "offload_xdp": {"rounds_pps_per_router_cpu_s": [500_000, 600_000]},
              "ceiling": {"rounds_pps_per_router_cpu_s": [500_000]}}  # a round missing
    assert run.paired_ratios(router, "offload_tc", "ceiling_tc") == [0.861, 0.809, 0.782]
    assert run.paired_ratios(router, "offload_xdp", "ceiling") == []
    r = {"slow_path_pps": 1, "offload_tc_pps": 792_552, "ceiling_tc_pps": 894_374,
         "offload_xdp_pps": 550_000, "ceiling_pps": 500_000, "router": router}
    run._ratios(r)
    # judged on the pairs' median, not on the median rounds' ratio (0.89x here)
    assert r["offload_tc_vs_ceiling_tc"] == 0.809 and r["offload_tc_vs_ceiling_tc_rounds"] == [
        0.861, 0.809, 0.782]
    assert r["offload_xdp_vs_ceiling"] == 1.1  # no pairs: the median rounds' ratio
    got = {goal: (text, ok) for goal, text, ok in report.goals(r)}
    assert got["TC offload at least 0.95x the bare TC ceiling"] == ("0.81x", False)
    assert got["XDP offload at the bare XDP ceiling (packets per router CPU-s)"][0] == "1.10x the ceiling"


def test_the_tcp_goal_shows_the_floor_the_bare_ceilings_set(tmp_path, monkeypatch):
    # Router CPU per GB of the 2026-12-03 09:33 `--quick --only tcp` run (s/GB).
    per_gb = {("slow_path", "mtu_frames"): 0.8879, ("offload_tc", "mtu_frames"): 0.7811,
              ("ceiling", "mtu_frames"): 1.0886, ("ceiling_tc", "mtu_frames"): 0.8584,
              ("slow_path", "nic_frames"): 1.1341, ("offload_xdp", "nic_frames"): 0.5326,
              ("ceiling", "nic_frames"): 0.431, ("ceiling_tc", "nic_frames"): 1.2712}
    t = {f"{m}_{v}_cpu_s_per_gb": c for (m, v), c in per_gb.items()}
    t |= {f"{m}_{v}_gbps": 3.0 for m, v in per_gb}
    r = {"machine": "m", "kernel": "k", "date": "d", "tcp": t}
    for (m, v), c in per_gb.items():
        r[f"{m}_tcp{'_nic' if v == 'nic_frames' else ''}_cpu_s_per_gb"] = c
    run._ratios(r)
    assert r["ceiling_tc_tcp_cpu_per_gb_vs_slow_path"] == 0.967
    assert r["ceiling_tcp_nic_cpu_per_gb_vs_slow_path"] == 0.38
    got = {goal: (text, ok) for goal, text, ok in report.goals(r)}
    goal = "TCP: router CPU per GB in the best mode at most 0.5x the slow path's, "
    # judged on the offloads alone; the ceilings are shown as the floor
    assert got[goal + "frames as skbs (veth)"] == (
        "0.88x (offload_tc); the bare ceilings' floor: ceiling 1.23x, ceiling_tc 0.97x", False)
    assert got[goal + "frames as from a NIC"] == (
        "0.47x (offload_xdp); the bare ceilings' floor: ceiling 0.38x, ceiling_tc 1.12x", True)
    text = written(r, tmp_path, monkeypatch)
    assert "| ceiling_tc | mtu_frames | 3.00 | 1.00x | 0.858 | 0.97x |" in text
    assert "| ceiling | nic_frames | 3.00 | 1.00x | 0.431 | 0.38x |" in text
    assert "cannot be met by that hook in this lab" in text


def trial(p99: float | None, lost: int = 0) -> dict:
    return {"latency_ms": {"p99": p99} if p99 is not None else {}, "lost": lost}


def test_a_new_flow_rate_is_judged_on_its_median_trial():
    # one trial's stall does not decide the rate, in either direction
    assert run.rate_kept_up([trial(16.2), trial(3.1), trial(4.0)])
    assert not run.rate_kept_up([trial(2.0), trial(7.5), trial(9.0)])
    assert run.median_p99([trial(None), trial(1.0), trial(2.0)]) == 2.0  # none counts as worst
    # a lost flow in any trial fails the rate, whatever the latencies
    assert not run.rate_kept_up([trial(1.0), trial(1.0, lost=3), trial(1.0)])
    assert not run.rate_kept_up([])
    # a sender that fell behind did not try the rate
    at_rate = [dict(trial(1.0), rate=20000.0, sent_per_s=s) for s in (20000, 19983, 18000)]
    assert not run.rate_kept_up(at_rate)
    assert run.rate_kept_up(at_rate[:2])


def test_the_page_lists_every_trial_and_the_rates_verdict(tmp_path, monkeypatch):
    trials = [dict(trial(p), rate=1000.0, flows=2000, offloaded=2000, passed=0, kept_up=p < 5,
                   trial=i + 1, rate_kept_up=True, agent_us_per_flow=250.0, loadavg="0.5",
                   sent_per_s=1000)
              for i, p in enumerate((16.2, 3.1, 4.0))]
    own = [dict(t, rate=5000.0, flows=10000, offloaded=10000, rate_kept_up=False) for t in trials]
    setup = {"flows": 1000, "rate_per_s": 400.0, "offloaded": 1000, "latency_ms": {"p99": 1.0},
             "rate_trials": trials, "sustained_rate_per_s": 1000.0,
             "rate_trials_own_core": own, "sustained_rate_per_s_own_core": 2000.0}
    page = written({**QUICK, "setup": setup}, tmp_path, monkeypatch)
    rows = [line for line in page.splitlines() if line.startswith("| 1000 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["1", "2", "3"]
    assert [r.split("|")[3].strip() for r in rows] == ["1,000"] * 3
    assert all(r.split("|")[12].strip() == "True" for r in rows)
    assert "Highest sustained new-flow rate (none lost, p99 < 5 ms): 1000 per second." in page
    # the own-core series in a table of its own, after the first one
    own_rows = [line for line in page.splitlines() if line.startswith("| 5000 |")]
    assert [r.split("|")[12].strip() for r in own_rows] == ["False"] * 3
    assert page.index(rows[-1]) < page.index("agent alone on the other core") < page.index(own_rows[0])
    assert "Highest sustained new-flow rate, agent on a core of its own: 2000 per second." in page


def test_the_agent_rows_show_what_was_flushed_and_the_event_sockets_trouble(tmp_path, monkeypatch):
    row = {"flows": 10_000, "offloaded_at_start": 10_000, "offloaded": 10_000, "cpu_share": 0.0071,
           "rss_mb": 37.3, "rss_idle_mb": 30.1, "window_s": 20, "conntrack_refreshes": 4_000,
           "create_s": 3.2, "conntrack_entries_flushed": 50_123, "conntrack_entries_at_start": 0,
           "event_overflows": 2, "reconciles": 1, "loadavg": "0.4"}
    tcp = {"slow_path_default_gbps": 10.0, "offload_tc_default_gbps": 12.0,
           "offload_tc_default_retransmits": 317, "slow_path_default_retransmits": 1_204}
    page = written({**QUICK, "agent": [row], "tcp": tcp}, tmp_path, monkeypatch)
    (line,) = [x for x in page.splitlines() if x.startswith("| 10,000 |")]
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[9:13] == ["50,123", "0", "2", "1"]
    assert "`conntrack -F`" in page
    (tc,) = [x for x in page.splitlines() if x.startswith("| offload_tc | default |")]
    assert [c.strip() for c in tc.split("|")[1:-1]][8] == "317"
    assert "1,000-packet pfifo" in page
