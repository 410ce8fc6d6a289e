"""The bench's NIC-like sender (bench/wire.py): its TCP frames must reach the
router's port as XDP frames in that port's NAPI, not as the sender's skbs,
or the bench's ``nic_frames`` figures would measure the lab's plain veth."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench import tools, wire
from offloader.lab import WAN_4, Host, Topology, _transfer
from tests.poll import poll


@pytest.fixture(scope="module")
def wire_object() -> str:
    return str(tools.build()["wire"])


@pytest.fixture
def nic(lab: Topology, wire_object: str) -> Iterator[Host]:
    with wire.nic_sender(lab, wire_object) as host:
        yield host
    names = {h.name for h in lab.hosts}
    assert f"ofl-{lab.tag}-nic" not in names and f"ofl-{lab.tag}-wire" not in names


def test_tcp_from_the_nic_sender_arrives_intact_as_xdp_frames(lab: Topology, nic: Host) -> None:
    wire_ns = Host(f"ofl-{lab.tag}-wire")
    sent0 = wire_ns.ethtool_stats("wb")["tx_queue_0_xdp_xmit"]
    rx0 = lab.router.link_stat(wire.PORT, "rx_packets")
    size = 2_000_000
    out = _transfer(nic, lab.wan, WAN_4, 9000, 9000, "tcp", 4, size, 60.0, 0, 0)
    assert out["intact"], out
    # Every frame lan3p received was handed over by its peer as an XDP frame
    # (ndo_xdp_xmit, counted as the peer's xdp_xmit), none as an skb (which
    # the peer would count as a plain transmit), and they were MTU frames. The
    # last frames handed over may not have been received yet: polled, bounded.
    def counts() -> tuple[int, int]:
        return (wire_ns.ethtool_stats("wb")["tx_queue_0_xdp_xmit"] - sent0,
                lab.router.link_stat(wire.PORT, "rx_packets") - rx0)

    def settled() -> tuple[int, int] | None:
        c = counts()
        return c if c[0] == c[1] else None

    # Judged on the reading that matched: a later one can catch in flight a
    # frame the sender's host sent after the transfer, counted as handed
    # over and not yet as received (CI once saw 1408, 1407).
    got = poll(settled, timeout=5, step=0.05)
    assert got, (counts(), lab.router.ethtool_stats(wire.PORT))
    frames, _received = got
    assert frames >= size // 1500, frames


def test_the_nic_sender_leaves_nothing_behind(lab: Topology, wire_object: str) -> None:
    with wire.nic_sender(lab, wire_object):
        assert wire.PORT in lab.router.sh("ip -br link").stdout
    assert wire.PORT not in lab.router.sh("ip -br link").stdout
    assert f"ofl-{lab.tag}-wire" not in lab.router.sh("ip netns list").stdout
