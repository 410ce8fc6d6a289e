"""bench.run.Agent.status: a busy agent that misses the control deadline once does
not end a benchmark run of several minutes; an agent that never answers, or that
exited, still does. The control socket is faked (a stand-in topology whose status
raises as Topology.status does when `ebpf-offloader status` fails)."""

from __future__ import annotations

import types

import pytest

from bench import run


class FlakyTopo:
    def __init__(self, failures: int) -> None:
        self.failures, self.calls = failures, 0

    def status(self, check: bool = True, limit: int = 0) -> dict:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError("ebpf-offloader status --json: the agent did not answer")
        return {"counts": {"offloaded": 7}}


def agent_on(topo: FlakyTopo, exited: bool = False) -> run.Agent:
    agent = run.Agent.__new__(run.Agent)  # no uci file, no process: only status() is used
    agent.topo = topo
    agent.proc = types.SimpleNamespace(poll=lambda: 1 if exited else None)
    return agent


@pytest.fixture(autouse=True)
def no_pause(monkeypatch):
    monkeypatch.setattr(run.time, "sleep", lambda s: None)


def test_a_missed_deadline_is_asked_again():
    topo = FlakyTopo(failures=run.STATUS_TRIES - 1)
    assert agent_on(topo).status()["counts"]["offloaded"] == 7
    assert topo.calls == run.STATUS_TRIES


def test_an_agent_that_never_answers_ends_the_run():
    topo = FlakyTopo(failures=run.STATUS_TRIES)
    with pytest.raises(RuntimeError, match="did not answer"):
        agent_on(topo).status()
    assert topo.calls == run.STATUS_TRIES


def test_an_agent_that_exited_is_not_asked_again():
    topo = FlakyTopo(failures=1)
    with pytest.raises(RuntimeError):
        agent_on(topo, exited=True).status()
    assert topo.calls == 1
