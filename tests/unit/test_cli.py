"""The command line as a user meets it: exit codes, messages, the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from offloader.cli import main, render_status


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "offloader.cli", *args], capture_output=True,
                          text=True, timeout=60)


def test_config_error_names_file_line_option_and_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "ebpf-offloader"
    cfg.write_text("config offloader 'main'\n\toption enabled '1'\n\toption hook 'warp'\n")
    proc = run("config", "-c", str(cfg))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"{cfg}:3: hook: ")


def test_config_prints_effective_settings_with_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "ebpf-offloader"
    cfg.write_text("config offloader 'main'\n\toption enabled '1'\n\tlist interfaces 'br-lan'\n")
    proc = run("config", "-c", str(cfg), "--json", "-o", "max_flows=131072",
               "-o", "exclude_src=198.18.5.0/24 2001:db8:5::/64")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["enabled"] is True and got["interfaces"] == ["br-lan"]
    assert got["max_flows"] == 131072
    assert got["exclude_src"] == ["198.18.5.0/24", "2001:db8:5::/64"]
    assert got["hook"] == "auto"  # a default filled in


def test_bad_override_is_a_config_error() -> None:
    proc = run("config", "-o", "max_flows=5")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "command line: max_flows: 5 is out of range: must be 1024 to 4194304"
    assert run("config", "-o", "nonsense=1").returncode == 2


def test_every_command_has_help() -> None:
    for cmd in ("run", "status", "flush", "config", "lab"):
        proc = run(cmd, "--help")
        assert proc.returncode == 0 and "usage:" in proc.stdout


def test_unknown_command_is_a_usage_error() -> None:
    try:
        main(["frobnicate"])
    except SystemExit as exc:
        assert exc.code == 2


STATUS = {
    "running": True, "pid": 4242, "uptime_s": 3725.0,
    "interfaces": [{"name": "eth0", "ifindex": 2, "hook": "xdp"},
                   {"name": "wan", "ifindex": 7, "hook": "tc"}],
    "counts": {"offloaded": 1, "passed": 1, "pending": 1, "total": 3},
    "datapath": {"pass_stale": 0},
    "flows": [
        {"family": "ipv4", "proto": "tcp", "src": "198.18.1.2", "dst": "198.19.2.2",
         "sport": 40000, "dport": 443, "state": "offloaded", "packets": 2000,
         "bytes": 3_000_000, "in_dev": "eth0", "out_dev": "wan", "nat": {"src": "198.19.2.1"}},
        {"family": "ipv6", "proto": "udp", "src": "2001:db8:1::2", "dst": "2001:db8:2::2",
         "sport": 5000, "dport": 53, "state": "passed", "packets": 1, "bytes": 80,
         "in_dev": "eth0"},
        {"family": "ipv4", "proto": "udp", "src": "198.18.1.3", "dst": "198.19.2.2",
         "sport": 5001, "dport": 53, "state": "pending", "packets": 1, "bytes": 80,
         "in_dev": "eth0"},
    ],
}


def test_human_status_report() -> None:
    before = json.loads(json.dumps(STATUS))
    before["flows"][0]["bytes"] = 2_000_000
    text = render_status(STATUS, before, 1.0)
    assert "running, pid 4242, up 01:02:05" in text
    assert "eth0 (xdp), wan (tc)" in text
    assert "1 offloaded, 1 passed to the kernel, 1 pending" in text
    row = next(line for line in text.splitlines() if "198.18.1.2:40000" in line)
    assert "198.19.2.2:443" in row and "eth0>wan" in row and "2000" in row
    assert "1.0 MB/s" in row and "src=198.19.2.1" in row
    assert "shapers" not in text  # none seen: no line


def test_human_status_names_the_shapers_the_agent_saw() -> None:
    cur = {**STATUS, "shapers": [{"device": "wan", "qdisc": "cake"},
                                 {"device": "wan", "qdisc": "ingress"}]}
    line = next(x for x in render_status(cur, None, 1.0).splitlines() if x.startswith("shapers"))
    assert line.startswith("shapers: cake on wan, ingress on wan (flows through them go by tc")
