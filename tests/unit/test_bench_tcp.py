"""The TCP part of the bench measures every mode the same way: the router's
egress ports get a queue for the round and lose it afterwards, also when the
round fails, and iperf3's client and server run on the CPUs the round names, and a round
reports the sender's retransmits.
Hosts are faked (they record the commands a round gives them)."""

from __future__ import annotations

import json
import types

import pytest

from bench import run, tools


class RecordingHost:
    def __init__(self) -> None:
        self.cmds: list[str] = []
        self.argvs: list[tuple[str, ...]] = []

    def sh(self, cmd: str, check: bool = True) -> None:
        self.cmds.append(cmd)

    def popen(self, *cmd: str, **kw: object) -> types.SimpleNamespace:
        self.argvs.append(cmd)
        report = json.dumps({"end": {"sum_received": {"bits_per_second": 5e9},
                                     "sum_sent": {"retransmits": 3}}})
        return types.SimpleNamespace(communicate=lambda timeout=None: (report, None),
                                     kill=lambda: None, wait=lambda: None)


def test_each_port_has_a_queue_for_the_round_only():
    host = RecordingHost()
    with tools.egress_queue(host, ("wan0", "lan1p")):  # type: ignore[arg-type]
        during = list(host.cmds)
    assert during == ["tc qdisc replace dev wan0 root pfifo limit 1000",
                      "tc qdisc replace dev lan1p root pfifo limit 1000"]
    assert host.cmds[2:] == ["tc qdisc del dev wan0 root", "tc qdisc del dev lan1p root"]


def test_the_queues_go_when_the_round_fails():
    host = RecordingHost()
    with pytest.raises(RuntimeError):
        with tools.egress_queue(host, ("wan0",)):  # type: ignore[arg-type]
            raise RuntimeError("iperf3 failed")
    assert host.cmds[-1] == "tc qdisc del dev wan0 root"


def test_iperf_runs_client_and_server_where_asked(monkeypatch):
    monkeypatch.setattr(run.time, "sleep", lambda s: None)
    lan, wan = RecordingHost(), RecordingHost()
    topo = types.SimpleNamespace(lan1=lan, wan=wan)
    assert run.iperf(topo, 1.0, None, (1, 0)) == (5.0, 3)  # type: ignore[arg-type]
    assert lan.argvs[0][:3] == ("taskset", "-c", "1") and "iperf3" in lan.argvs[0]
    assert wan.argvs[0][:3] == ("taskset", "-c", "0") and "-s" in wan.argvs[0]
