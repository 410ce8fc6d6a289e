"""Runs INSIDE the 6.1 kernel lane: the agent offloads over a real QinQ stack
(`rw0.100.7`, XDP and TC, and the XDP path-MTU regression at `rw0` MTU 1500), a real
PPPoE session (`pppoe-wan`, XDP and TC) and PPPoE over VLAN 7 (XDP). One half of the
agent-offload cases; guest_offload_vlan.py, booted beside it, has the other. What each
case runs and checks: offload_cases.py (run_flows, check_flows, _case).
"""

from __future__ import annotations

import hashlib

import pytest

from .topology import (
    ip,
    pppoe_topology,
    qinq_topology,
    read_proc_pppoe,
    require_guest,
)

require_guest()

from .offload_cases import (  # noqa: E402  (after the guard)
    _case,
    _flows_context,
    _mss_of,
    bpffs,  # noqa: F401  (the module's autouse fixture: pytest finds it here)
    prepare_hosts,
    run_flows,
    running_agent,
)


@pytest.fixture(scope="module")
def qinq():
    with qinq_topology(svid=100, cvid=7, nat=True, nat6=False) as topo:
        yield topo


@pytest.fixture(scope="module")
def qinq_xdp_hand_on(qinq):
    """Where test_qinq_xdp_full_size_frames_at_mtu_1500 leaves its running XDP agent
    for test_qinq_offload[xdp] (which stops it); stopped here if that never ran."""
    box: dict = {}
    yield box
    agent = box.pop("agent", None)
    if agent is not None:
        agent.stop()


def test_qinq_xdp_full_size_frames_at_mtu_1500(qinq, qinq_xdp_hand_on):
    """Regression: with two tags, a full-size frame is 1522 bytes; an XDP redirect
    takes at most MTU + 18 on the egress device (the kernel's xdp_ok_fwd_dev), so at
    rw0 MTU 1500 the offloaded 1500-byte packets were dropped after the redirect and
    the transfer stalled. The resolver now lowers the XDP path MTU by 4 per tag past
    the first: the full-size LAN -> WAN segments go to the kernel (pass_mtu), the
    WAN -> LAN direction (its ACKs, out of rl0, untagged) stays offloaded, and the
    payload arrives. Data LAN -> WAN only: the far host's own full-size frames
    (both tags in the frame, 1522 bytes) do not fit rw0 at MTU 1500 at all, a
    veth limit (is_skb_forwardable), not the datapath's.

    Its agent, once this case has passed, stays running for test_qinq_offload[xdp]
    (rw0 back at MTU 1504, a change the running agent follows): one agent start
    under emulation (30-60 s) less."""
    prepare_hosts(qinq, "xdp")
    ip(qinq.router_ns, "link", "set", "rw0", "mtu", "1500")
    # the kernel's own frames leave rw0 with the outer tag in skb metadata (veth tx
    # VLAN offload), so they fit the far veth at 1504 as on the wire
    try:
        with running_agent(qinq, "xdp", "qinq-xdp", hand_on=qinq_xdp_hand_on) as agent:
            agent.wait_ready()
            got = run_flows(qinq, agent, [(4, "tcp", 5670)], sniff_wire=False, down_bytes=0)
            ctx = _flows_context(got, agent)
            flow = got["flows"][0]
            for leg in flow.legs.values():
                assert leg.error is None, f"{leg.name}: {leg.error}{ctx}"
                intact = hashlib.sha256(leg.got or b"").hexdigest() == leg.expect
                assert intact, f"{leg.name}: not intact{ctx}"
            want = flow.up.packets_after_go(_mss_of(qinq, 4))
            assert got["datapath"].get("pass_mtu", 0) >= 0.5 * want, ctx
            first, last = flow.at_go["down"], flow.at_end["down"]
            assert first and last and last["state"] == "offloaded", ctx
            # ACKs: at least one per four segments (delayed ACKs: one per two)
            assert last["packets"] - first["packets"] >= 0.25 * want, ctx
            print(f"qinq xdp at rw0 MTU 1500: intact in {got['seconds']}s, "
                  f"pass_mtu {got['datapath'].get('pass_mtu')}, redirect +{got['redirect']}")
    finally:
        ip(qinq.router_ns, "link", "set", "rw0", "mtu", "1504")


@pytest.mark.parametrize("hook", ["xdp", "tc"])
def test_qinq_offload(qinq, qinq_xdp_hand_on, hook):
    """XDP: the agent test_qinq_xdp_full_size_frames_at_mtu_1500 handed on, when
    that case ran and passed (else a new one); TC: a new one."""
    given = qinq_xdp_hand_on.pop("agent", None) if hook == "xdp" else None
    _case(qinq, hook, f"qinq-{hook}", 5620 if hook == "xdp" else 5630, given=given)


@pytest.fixture(scope="module")
def pppoe():
    with pppoe_topology(nat=True, ipv6=True) as topo:
        yield topo


@pytest.mark.parametrize("hook", ["xdp", "tc"])
def test_pppoe_offload(pppoe, hook):
    sessions = read_proc_pppoe(pppoe.router_ns)
    assert len(sessions) == 1, sessions  # the agent relies on /proc/net/pppoe alone
    _case(pppoe, hook, f"pppoe-{hook}", 5640 if hook == "xdp" else 5650)


def test_pppoe_over_vlan_offload_xdp():
    # XDP only: TC over PPPoE is proved on pppoe-wan over rw0 (the same ppp device
    # transmit path); one more agent start under emulation does not fit the budget
    with pppoe_topology(vid=7, nat=True, ipv6=True) as topo:
        assert [s.device for s in read_proc_pppoe(topo.router_ns)] == ["rw0.7"]
        _case(topo, "xdp", "pppoe-vlan-xdp", 5660)
