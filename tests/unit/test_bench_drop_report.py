"""The early-drop section of docs/benchmarks.md, from one run's figures."""

from __future__ import annotations

from typing import Any

from bench.drop import MODES, report_lines


def result(ns: dict[str, float]) -> dict[str, Any]:
    d: dict[str, Any] = {m: {"ns_per_packet": ns[m], "rounds_ns_per_packet": [ns[m]],
                             "kernel_saw": 10 if m == "kernel_drop" else 0} for m in MODES}
    d["kernel_saw_share"] = 0.0058
    return d


SKB = result({"kernel_drop": 3000.0, "early_drop": 1200.0, "early_drop_tc": 1300.0,
              "floor_xdp": 1500.0, "floor_tc": 1600.0})
FRAMES = result({"kernel_drop": 5000.0, "early_drop": 900.0, "early_drop_tc": 1500.0,
                 "floor_xdp": 250.0, "floor_tc": 1000.0})


def test_both_sources_each_with_their_own_ratios() -> None:
    text = "\n".join(report_lines(SKB, FRAMES))
    assert "| early drop, hook xdp | 900.0 | 0.18x | 900.0 | 0 |" in text
    assert "| early drop, hook xdp | 1200.0 | 0.40x | 1200.0 | 0 |" in text
    assert text.index("Frames as from a NIC") < text.index("Frames as skbs")
    assert "0.18x of the kernel's drop with hook xdp, 0.30x with hook tc" in text
    assert "costs 0.50x" in text  # the skb floor: min(1500, 1600) / 3000


def test_without_the_frames_run_only_the_skb_table() -> None:
    text = "\n".join(report_lines(SKB))
    assert "Frames as from a NIC" not in text
    assert text.count("| kernel drop (forward rule, no agent) |") == 1
