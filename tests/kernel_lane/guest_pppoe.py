"""Runs INSIDE the 6.1 kernel lane (PPP/PPPoE are absent on the host kernel).

A real PPPoE session: pppoe-server (kernel mode) in an ISP namespace, pppd with the
kernel PPPoE plugin in the router namespace. Proves that TCP crosses
LAN -> router -> PPPoE -> ISP intact both ways (NATed, as a home router does, and
routed), also with PPPoE over an 802.1Q VLAN, and that /proc/net/pppoe in the router
namespace lists the session id, the peer (ISP) MAC and the Ethernet device: that file
is the agent's source for the ppp-device -> (session, peer MAC, device) mapping.
"""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from .topology import (
    PPP_IFNAME,
    Sniffer,
    assert_exchange_intact,
    expected_peer,
    ip_json,
    link_stats,
    parse_proc_pppoe,
    pppd_log_session,
    pppoe_topology,
    read_proc_pppoe,
    require_guest,
    server_sessions,
    tcp_exchange,
)

require_guest()


def test_running_on_second_kernel():
    assert platform.release().startswith("6.1."), platform.release()


def test_parse_proc_pppoe_byte_order():
    # as printed by a little-endian 6.1 kernel for session 1 and session 0x1234
    text = ("Id       Address              Device\n"
            "00000100 aa:bb:cc:00:00:01    rw0\n"
            "00003412 AA:BB:CC:00:00:02    rw0.7\n")
    s = parse_proc_pppoe(text)
    assert [(x.session_id, x.peer_mac, x.device) for x in s] == [
        (1, "aa:bb:cc:00:00:01", "rw0"), (0x1234, "aa:bb:cc:00:00:02", "rw0.7")]


# PPPoE straight on Ethernet, NATed (the usual home router) and routed; PPPoE over an
# 802.1Q VLAN (e.g. VLAN 7 of several European ISPs), NATed. Each costs ~15 s here.
@pytest.mark.parametrize(("vid", "nat"), [(None, True), (None, False), (7, True)],
                         ids=["nat-untagged", "routed-untagged", "nat-vlan7"])
def test_pppoe_session_tcp_intact(vid, nat):
    with pppoe_topology(vid=vid, nat=nat) as topo:
        px = topo.pppoe
        # the PPP device in the router
        link = ip_json(topo.router_ns, "-d", "link", "show", "dev", PPP_IFNAME)[0]
        assert link["link_type"] == "ppp", link
        assert link["mtu"] <= 1492, link["mtu"]  # 1500 - 8 bytes PPPoE/PPP header

        # /proc/net/pppoe in the router namespace: session id, peer MAC, device
        sessions = read_proc_pppoe(topo.router_ns)
        assert len(sessions) == 1, sessions
        s = sessions[0]
        assert s.peer_mac == px["isp_mac"].lower(), (s, px)
        assert s.device == px["router_eth"], (s, px)
        assert 1 <= s.session_id <= 0xFFFE, s
        # the ISP side lists the same session towards the router's MAC
        isp = server_sessions(topo.wan_ns)
        assert [(x.session_id, x.peer_mac, x.device) for x in isp] == [
            (s.session_id, px["router_mac"].lower(), px["isp_eth"])], (isp, px)
        assert px["server_mode"] == "kernel", px
        assert pppd_log_session(px["client_log"]) == (s.session_id, PPP_IFNAME), (
            Path(px["client_log"]).read_text())

        before = link_stats(topo.router_ns, PPP_IFNAME)
        with Sniffer(topo.router_ns, "rw0") as sn:
            res = tcp_exchange(topo, family=4, port=5301)
            frames = sn.frames()
        # on the wire: (VLAN tag,) PPPoE session header with this session id, PPP IPv4,
        # between the router's and the ISP's MACs: what the datapath will have to write
        tcp = [f for f in frames if f.ip_proto == 6]
        assert len(tcp) >= 20, (len(frames), frames[:5])
        want_tags = ((0x8100, vid),) if vid is not None else ()
        assert {(f.tags, f.ethertype, f.pppoe_session, f.ppp_proto) for f in tcp} == {
            (want_tags, 0x8864, s.session_id, 0x0021)}, tcp[:3]
        rmac, imac = px["router_mac"].lower(), px["isp_mac"].lower()
        assert {(f.outgoing, f.src, f.dst) for f in tcp} == {(True, rmac, imac),
                                                             (False, imac, rmac)}
        # inside the session: NATed to the PPP address, or the LAN host's own
        assert {f.ip_src for f in tcp if f.outgoing} == {expected_peer(topo)}
        assert_exchange_intact(res)
        assert res["server"]["peer"] == expected_peer(topo), (res["server"], topo)
        print(f"PPPoE session {s.session_id} up in {px['up_seconds']}s "
              f"({px['server_mode']}-mode server); TCP exchange {res['client']['seconds']}s")
        after = link_stats(topo.router_ns, PPP_IFNAME)
        assert after["tx_bytes"] - before["tx_bytes"] >= res["up_bytes"], (before, after)
        assert after["rx_bytes"] - before["rx_bytes"] >= res["down_bytes"], (before, after)
        # the Ethernet device under it carried the session frames
        eth = link_stats(topo.router_ns, px["router_eth"])
        assert eth["rx_bytes"] >= res["down_bytes"], eth


def test_pppoe_two_sessions_same_device():
    """Two sessions from one router over one Ethernet device to one ISP (same peer MAC):
    /proc/net/pppoe lists both with distinct ids, identical MAC and device, so it alone
    cannot say which ppp device carries which session; pppd's log can (checked here).
    Traffic routed via the second session uses the second ppp device."""
    with pppoe_topology(sessions=2, nat=True) as topo:
        px = topo.pppoe
        listed = read_proc_pppoe(topo.router_ns)
        assert sorted(x.session_id for x in listed) == [1, 2], listed
        assert {(x.peer_mac, x.device) for x in listed} == {
            (px["isp_mac"].lower(), px["router_eth"])}, listed
        by_log = {pppd_log_session(ss["log"]) for ss in px["sessions"]}
        assert by_log == {(1, "pppoe-wan"), (2, "pppoe-wan1")}, by_log
        assert [ss["addr"] for ss in px["sessions"]] == ["198.18.200.10", "198.18.200.11"]

        w0, w1 = (link_stats(topo.router_ns, n) for n in ("pppoe-wan", "pppoe-wan1"))
        res = tcp_exchange(topo, port=5311, server_addr=px["second_target"])
        assert_exchange_intact(res)
        assert res["server"]["peer"] == "198.18.200.11", res["server"]  # NAT on session 2
        w0b, w1b = (link_stats(topo.router_ns, n) for n in ("pppoe-wan", "pppoe-wan1"))
        assert w1b["rx_bytes"] - w1["rx_bytes"] >= res["down_bytes"], (w1, w1b)
        assert w0b["rx_bytes"] - w0["rx_bytes"] < res["down_bytes"] // 10, (w0, w0b)


def test_pppoe_processes_and_namespaces_removed():
    names = [n["name"] for n in ip_json(None, "netns", "list")]
    assert not [n for n in names if n.startswith("kl")], names
    procs = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                comm = (d / "comm").read_text().strip()
            except OSError:
                continue
            if comm in ("pppd", "pppoe-server"):
                procs.append((d.name, comm))
    assert not procs, procs
