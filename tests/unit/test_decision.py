"""The offload decision: conntrack's gate and the configuration's exclusions,
without root (entries built as the conntrack decoder builds them)."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from pyroute2.netlink.nfnetlink.nfctsocket import (
    IPS_ASSURED,
    IPS_CONFIRMED,
    IPS_DST_NAT,
    IPS_DYING,
    IPS_OFFLOAD,
    IPS_SEQ_ADJUST,
    IPS_SRC_NAT,
    TCP_CONNTRACK_CLOSE,
    TCP_CONNTRACK_CLOSE_WAIT,
    TCP_CONNTRACK_ESTABLISHED,
    TCP_CONNTRACK_FIN_WAIT,
    TCP_CONNTRACK_LAST_ACK,
    TCP_CONNTRACK_SYN_RECV,
    TCP_CONNTRACK_SYN_SENT,
    TCP_CONNTRACK_TIME_WAIT,
)

from offloader.conntrack import IPS_HW_OFFLOAD, CtEntry, Tuple5, nat_target
from offloader.datapath import FlowKey
from offloader.decision import (
    Decision,
    Exclusions,
    PassReason,
    closing,
    offloadable,
    source_nat_elsewhere,
)

ip = ipaddress.ip_address
LAN, WAN, PUBLIC = ip("198.18.1.2"), ip("198.19.2.2"), ip("198.19.0.1")


def entry(proto: int = socket.IPPROTO_TCP, *, status: int = IPS_CONFIRMED,
          tcp_state: int = TCP_CONNTRACK_ESTABLISHED, helper: bool = False,
          zone: int = 0) -> CtEntry:
    """A masqueraded LAN -> WAN connection: orig LAN:40000 > WAN:443, reply
    WAN:443 > PUBLIC:61000."""
    orig = Tuple5(proto, LAN, WAN, 40000, 443)
    reply = Tuple5(proto, WAN, PUBLIC, 443, 61000)
    return CtEntry(orig, reply, status | IPS_SRC_NAT, tcp_state if proto == 6 else -1, zone,
                   helper, 120)


@pytest.mark.parametrize("state, want", [
    (TCP_CONNTRACK_SYN_SENT, Decision.WAIT),
    (TCP_CONNTRACK_SYN_RECV, Decision.WAIT),
    (TCP_CONNTRACK_ESTABLISHED, Decision.OFFLOAD),
    (TCP_CONNTRACK_FIN_WAIT, Decision.WAIT),
    (TCP_CONNTRACK_CLOSE_WAIT, Decision.WAIT),
    (TCP_CONNTRACK_TIME_WAIT, Decision.WAIT),
])
def test_tcp_only_when_established(state: int, want: Decision) -> None:
    assert offloadable(entry(tcp_state=state), offload_udp="yes") is want


@pytest.mark.parametrize("status, want", [
    (IPS_CONFIRMED | IPS_DYING, PassReason.DYING),
    (0, PassReason.UNCONFIRMED),
    (IPS_CONFIRMED | IPS_SEQ_ADJUST, PassReason.SEQ_ADJUST),
    (IPS_CONFIRMED | IPS_OFFLOAD, PassReason.FLOWTABLE),
    (IPS_CONFIRMED | IPS_HW_OFFLOAD, PassReason.FLOWTABLE),
])
def test_conntrack_status_keeps_flows_with_the_kernel(status: int, want: PassReason) -> None:
    assert offloadable(entry(status=status), offload_udp="yes") is want
    assert offloadable(entry(socket.IPPROTO_UDP, status=status), offload_udp="yes") is want


def test_a_helper_keeps_the_connection_with_the_kernel() -> None:
    assert offloadable(entry(helper=True), offload_udp="yes") is PassReason.HELPER


@pytest.mark.parametrize("offload_udp, status, want", [
    ("yes", IPS_CONFIRMED, Decision.OFFLOAD),
    ("assured", IPS_CONFIRMED, Decision.WAIT),
    ("assured", IPS_CONFIRMED | IPS_ASSURED, Decision.OFFLOAD),
    ("no", IPS_CONFIRMED | IPS_ASSURED, PassReason.UDP_DISABLED),
])
def test_udp_setting(offload_udp: str, status: int, want: Decision | PassReason) -> None:
    assert offloadable(entry(socket.IPPROTO_UDP, status=status), offload_udp=offload_udp) is want


@pytest.mark.parametrize("state, want", [
    (TCP_CONNTRACK_ESTABLISHED, False), (TCP_CONNTRACK_FIN_WAIT, True),
    (TCP_CONNTRACK_CLOSE_WAIT, True), (TCP_CONNTRACK_LAST_ACK, True),
    (TCP_CONNTRACK_TIME_WAIT, True), (TCP_CONNTRACK_CLOSE, True),
])
def test_closing_states(state: int, want: bool) -> None:
    assert closing(entry(tcp_state=state)) is want
    assert not closing(entry(socket.IPPROTO_UDP))


def test_nat_target_of_either_direction() -> None:
    e = entry()
    # The original direction leaves masqueraded: source becomes PUBLIC:61000.
    assert nat_target(e, reply=False) == Tuple5(6, PUBLIC, WAN, 61000, 443)
    # The reply direction comes back de-masqueraded: destination LAN:40000.
    assert nat_target(e, reply=True) == Tuple5(6, WAN, LAN, 443, 40000)


def test_dnat_entry_reply_direction() -> None:
    # A port forward: orig WAN:5000 > PUBLIC:8080, reply LAN:80 > WAN:5000.
    e = CtEntry(Tuple5(6, WAN, PUBLIC, 5000, 8080), Tuple5(6, LAN, WAN, 80, 5000),
                IPS_CONFIRMED | IPS_DST_NAT, TCP_CONNTRACK_ESTABLISHED, 0, False, 60)
    assert nat_target(e, reply=False) == Tuple5(6, WAN, LAN, 5000, 80)
    assert nat_target(e, reply=True) == Tuple5(6, PUBLIC, WAN, 8080, 5000)


def test_exclusions() -> None:
    ex = Exclusions(src=(ipaddress.ip_network("198.18.1.0/24"),),
                    dst=(ipaddress.ip_network("2001:db8:9::/48"),), ifindexes=frozenset({7}))
    assert ex.excludes(LAN, WAN, (2, 3))
    assert not ex.excludes(ip("198.18.2.2"), WAN, (2, 3))
    assert ex.excludes(ip("2001:db8:1::2"), ip("2001:db8:9::1"), (2, 3))
    assert not ex.excludes(ip("2001:db8:1::2"), ip("2001:db8:8::1"), (2, 3))
    assert ex.excludes(ip("198.18.2.2"), WAN, (2, 7))
    assert not Exclusions().excludes(LAN, WAN, (7,))


def test_source_nat_to_another_devices_address_stays_with_the_kernel() -> None:
    # LAN:40000 > WAN:443 masqueraded to PUBLIC, which device 10 (wan1) holds
    key = FlowKey(2, socket.AF_INET, socket.IPPROTO_TCP, LAN, WAN, 40000, 443)
    target = nat_target(entry(), False)
    assert target.src == PUBLIC
    assert source_nat_elsewhere(key, target, 10, 20)  # the route now leaves by wan2
    assert not source_nat_elsewhere(key, target, 10, 10)  # still by wan1
    assert not source_nat_elsewhere(key, target, None, 20)  # not local (a routed prefix)
    # no source NAT: the reply direction of the same connection
    back = FlowKey(20, socket.AF_INET, socket.IPPROTO_TCP, WAN, PUBLIC, 443, 61000)
    assert not source_nat_elsewhere(back, nat_target(entry(), True), 2, 20)
