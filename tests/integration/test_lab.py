"""The lab itself: its neighbour warm-up needs no tool beyond Python (a
fresh Debian 12 has no ping), leaves every namespace knowing its peers, and
says so when it fails (real namespaces, no fakes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from offloader import lab
from tests.conftest import need_root

pytestmark = pytest.mark.root


def test_warm_up_resolves_every_peer_without_ping(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    need_root()
    # As on a machine without ping: a `ping` first on PATH that only notes
    # it was called and fails as a missing command does.
    calls = tmp_path / "ping-calls"
    fake = tmp_path / "bin" / "ping"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\nexit 127\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ.get('PATH', '')}")
    with lab.lab_network() as topo:
        want = {topo.router: (lab.LAN1_4, lab.LAN1_6, lab.LAN2_4, lab.LAN2_6, lab.WAN_4,
                              lab.WAN_6),
                topo.lan1: (lab.ROUTER_LAN4, lab.ROUTER_LAN6),
                topo.lan2: (lab.ROUTER_LAN4, lab.ROUTER_LAN6),
                topo.wan: (lab.ROUTER_WAN4, lab.ROUTER_WAN6)}
        assert {h.name: lab.unresolved(h, a) for h, a in want.items()} == {
            h.name: [] for h in want}
        assert "warm-up failed" not in capsys.readouterr().err
        assert not calls.exists(), calls.read_text()
        # An address nobody answers for: False, and a line that names it.
        assert not lab.warm_neighbours({topo.router: ("198.18.1.99",)}, timeout=0.5)
        err = capsys.readouterr().err
        assert "lab: neighbour warm-up failed" in err and "198.18.1.99" in err, err


def test_br_lan_keeps_its_mac_when_a_port_with_a_lower_one_joins() -> None:
    """A bridge whose MAC is not set follows its lowest port's; the lab's
    (as OpenWrt's) is set. Arranged so that without it lan1 would send to
    lan2p's MAC through lan1p when a lower port joins, which IP drops."""
    need_root()
    with lab.lab_network() as topo:
        r = topo.router
        mac = r.sh("cat /sys/class/net/br-lan/address").stdout.strip()
        r.sh("ip link set lan1p address 02:ff:ff:ff:ff:f0 && "
             "ip link set lan2p address 02:00:00:00:00:02")
        topo.lan1.sh("ip neigh flush dev eth0")
        assert lab.warm_neighbours({topo.lan1: (lab.ROUTER_LAN4,)})
        r.sh("ip link add lowp address 02:00:00:00:00:01 type veth peer name lowq && "
             "ip link set lowp master br-lan && ip link set lowp up")
        assert r.sh("cat /sys/class/net/br-lan/address").stdout.strip() == mac
        out = topo.transfer(proto="tcp", size=200_000, timeout=10)
        assert out.get("intact"), out
