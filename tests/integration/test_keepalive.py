"""The long conntrack timeout of offloaded flows and the hand-back that puts
the kernel's own back, on the real kernel (namespaces, nftables NAT,
conntrack, the agent; no fakes)."""

from __future__ import annotations

import re
import sys
import time
from typing import Any

import pytest

from offloader.lab import Topology, lab_network
from tests.conftest import need_root
from tests.integration.transfer import background_transfer
from tests.nsutil import namespaces, tracked_sender
from tests.poll import poll

pytestmark = pytest.mark.root


def _entry(topo: Topology, sport: int) -> tuple[str, int] | None:
    """(id, timeout) of the router's UDP conntrack entry from ``sport``, or None."""
    out = topo.router.sh(f"conntrack -L -o id -p udp --sport {sport} 2>/dev/null",
                         check=False).stdout
    for line in out.splitlines():
        ident = re.search(r"\bid=(\d+)", line)
        if ident:
            return ident.group(1), int(line.split()[2])
    return None


def _offloaded(topo: Topology, sport: int) -> bool:
    st = topo.status() or {"flows": []}
    return any(f["proto"] == "udp" and f["sport"] == sport and f["state"] == "offloaded"
               for f in st["flows"])


def _long_while_offloaded(topo: Topology, sport: int, class_timeout: int,
                          result: dict[str, Any]) -> tuple[str, list[int]]:
    """While the stream runs: the entry keeps one id and a timeout past its
    class's (the agent's long one); returns the id and the timeouts read."""
    assert poll(lambda: _offloaded(topo, sport)), topo.status()
    first = poll(lambda: _entry(topo, sport))
    assert first, "no conntrack entry"
    ident, seen = first[0], []
    while "intact" not in result and "error" not in result:
        got = _entry(topo, sport)
        assert got is not None and got[0] == ident, (ident, got)  # never lost, never replaced
        seen.append(got[1])
        time.sleep(0.5)
    assert result.get("intact"), result
    assert max(seen) > 10 * class_timeout, seen  # renewed with the long timeout
    return ident, seen


def test_an_unreplied_udp_flow_lives_on_the_long_timeout_and_expires_when_idle(
        bpf_object: Any) -> None:
    """Unreplied UDP with a 4 s conntrack timeout, a stream of 8 s: only the
    agent's long timeout keeps its entry (one id throughout). Once the
    stream stops the flow is handed back at conntrack's 4 s (not the
    agent's udp_timeout of 60 s) and, the kernel having forgotten it by
    then, its entry is deleted."""
    need_root()
    with lab_network() as topo:
        topo.router.sh("sysctl -qw net.netfilter.nf_conntrack_udp_timeout=4")
        topo.start_agent(hook="xdp")
        sport = 41101
        t, result = background_transfer(topo, proto="udp", family=4, size=8_000_000,
                                        rate_pps=1000, timeout=40, sport=sport)
        try:
            _long_while_offloaded(topo, sport, 4, result)
        finally:
            t.join(timeout=60)
        # Handed back by idling out after conntrack's 4 s (plus passes, and
        # ticks late on a loaded machine), far before the agent's udp_timeout
        # of 60 s; the kernel would have forgotten it, so the entry is gone.
        assert poll(lambda: _entry(topo, sport) is None, timeout=20), _entry(topo, sport)
        st = topo.status()
        assert st and st["agent"]["torn_down"].get("idle", 0) >= 1, st["agent"]


def test_a_flow_handed_back_gets_the_kernels_timeout_and_the_kernel_takes_over(
        bpf_object: Any) -> None:
    """udp_timeout 2 s hands a flow back before conntrack's own 20 s: its
    entry, 300 s while offloaded, gets 20 s less the time since its last
    packet, and the same connection (same id) carries on through the kernel."""
    need_root()
    with lab_network() as topo:
        topo.router.sh("sysctl -qw net.netfilter.nf_conntrack_udp_timeout=20")
        topo.start_agent(hook="xdp", extra=["-o", "udp_timeout=2"])
        sport = 41102
        t, result = background_transfer(topo, proto="udp", family=4, size=4_000_000,
                                        rate_pps=1000, timeout=40, sport=sport)
        try:
            ident, _ = _long_while_offloaded(topo, sport, 20, result)
        finally:
            t.join(timeout=60)
        stopped = time.monotonic()  # the last datagram went before this
        assert poll(lambda: not _offloaded(topo, sport), timeout=15), topo.status()

        read = 0.0

        def put_back() -> tuple[str, int] | None:
            nonlocal read
            read = time.monotonic()  # the entry is read after this
            got = _entry(topo, sport)
            return got if got is not None and got[1] <= 20 else None

        got = poll(put_back, timeout=10)
        assert got, _entry(topo, sport)
        # The kernel's value: 20 s from the last packet, so no more than what
        # is left of 20 s since the stream stopped (a second for rounding).
        assert got[0] == ident and 0 < got[1] <= 20 - (read - stopped) + 1, (got, read - stopped)
        # The kernel takes over: the connection goes on under the same entry.
        t, result = background_transfer(topo, proto="udp", family=4, size=50_000, rate_pps=500,
                                        timeout=20, sport=sport)
        t.join(timeout=30)
        assert result.get("intact"), result
        again = _entry(topo, sport)
        assert again is not None and again[0] == ident, (ident, again)


PROBE = r"""
import ipaddress, json, socket, time
from offloader.conntrack import Conntrack, Tuple5
from offloader.ctevents import CtEvents
# Listening first, as the agent does: with nf_conntrack_events=2 an entry
# created while nobody listens carries no event extension, and no events.
ct = Conntrack()
ev = CtEvents()
ev.ignore_sender(ct.portid())  # as the agent: its own updates cause no event it reads
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("198.18.0.1", 40011))
s.sendto(b"x", ("198.18.0.2", 5353))
t = Tuple5(17, ipaddress.ip_address("198.18.0.1"), ipaddress.ip_address("198.18.0.2"), 40011, 5353)
raw = (t.src.packed, t.dst.packed, t.sport.to_bytes(2, "big"), t.dport.to_bytes(2, "big"), 17)
ct.refresh_keys([(*raw, False, 0, 300)], [b"t"])
long = ct.get(t)[0].timeout
ct.put_back([(*raw, False, 0, 7)])
back = ct.get(t)[0].timeout
ct.put_back([(*raw, False, 0, 0)])
after = ct.get(t)
destroyed = []
for _ in range(100):  # bounded poll (about 2 s) for the deletion's DESTROY event
    destroyed += [e.orig_id for e in ev.read_destroys() if e.kind == "destroy"]
    if destroyed:
        break
    time.sleep(0.02)
ct.put_back([(*raw, False, 0, 0)])  # already gone: no failure
print(json.dumps({"long": long, "back": back, "after": after is None,
                  "destroyed": len(destroyed), "failures": ct.update_failures,
                  "gone": len(ct.take_gone())}))
"""


def test_put_back_sets_or_deletes_the_real_entry(bpf_object: object) -> None:
    import json

    need_root()
    with namespaces("ka") as (ns,):
        tracked_sender(ns)
        got = json.loads(ns.run([sys.executable, "-c", PROBE]).stdout)
        assert 290 < got["long"] <= 300 and 0 < got["back"] <= 7, got
        # Deleted: gone from conntrack, and its DESTROY reached the agent's
        # event socket (deletions do not come from the socket it ignores).
        assert got["after"] and got["destroyed"] == 1, got
        assert got["failures"] == 0 and got["gone"] == 0, got
