"""The lane benchmark's UDP step on this machine's kernel, as the 6.1 guest
runs it (bench/lane_guest.py): the NIC-like sender's live frames into our
XDP hook. Every frame of the burst must be the measured flow, offloaded
before the burst starts: a frame our hook rewrote and forwarded must not
come back into the router as a new tuple (bench/flood.bpf.c, flood_frame),
and the wait must hold out for the measured flow's own entry, not for any
offloaded one (the WAN host's reply is offloaded too)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench import lane_guest, tools
from bench import run as brun
from offloader.lab import ROUTER_WAN4, Topology


@pytest.fixture(scope="module")
def bins() -> dict:
    return tools.build()


@pytest.fixture
def nic(lab: Topology, bins: dict) -> Iterator[lane_guest.Feed]:
    with lane_guest.feed(lab, bins, "nic") as src:
        lab.status = lambda check=True, limit=0: lane_guest.inproc_status(lab, check, limit)  # type: ignore[method-assign]
        yield src


def test_every_frame_of_the_burst_is_the_measured_offloaded_flow(lab: Topology, bins: dict,
                                                                    nic: lane_guest.Feed) -> None:
    sport = 41002
    want = lane_guest.measured_flow(nic, sport)
    with brun.Agent(lab, "xdp") as agent, \
            tools.delivery_counter(lab.wan, "eth0", bins["count"]) as count:
        brun.blast(lab, bins["blast"], sport=sport, count=5, rate=50, seconds=2, sender=nic.host, src=nic.src)
        lane_guest.udp_reply(lab, bins, sport)
        w = lane_guest.wait_flow_offloaded(agent.status, want, timeout=20)
        d0 = count()
        send = lane_guest.live_frames(lab, bins, nic)
        sent = send(sport, 1.0)
        st = agent.status()
        delivered = count() - d0
    burst = lane_guest.counter_delta(w["status"]["datapath"], st["datapath"])
    assert sent["sent"] > 1000, sent
    # the hook forwarded what it saw, and passed nothing to the kernel: no
    # frame arrived with a tuple it had no verdict for
    assert burst.get("redirect", 0) > 1000, burst
    assert burst.get("pending", 0) + burst.get("new", 0) + burst.get("pass_verdict", 0) == 0, burst
    assert delivered > 1000, delivered
    # the router's own WAN address never came in from the LAN as a source
    ct = lab.router.sh("conntrack -L -p udp -s " + ROUTER_WAN4 + " --dport 9999 2>/dev/null",
                       check=False).stdout
    assert "sport=" not in ct, ct
    assert lane_guest.flow_verdict(st["flows"], want) == "offloaded"
