"""Our conntrack access against the kernel's ctnetlink (a test namespace)."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import need_root
from tests.nsutil import namespaces, tracked_sender

pytestmark = pytest.mark.root

PROBE = r"""
import ipaddress, json, socket, sys, time
from offloader.conntrack import Conntrack, Tuple5
from offloader.ctevents import CtEvents
ev = CtEvents()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("198.18.0.1", 40001))
s.sendto(b"x", ("198.18.0.2", 5353))
t = Tuple5(17, ipaddress.ip_address("198.18.0.1"), ipaddress.ip_address("198.18.0.2"), 40001, 5353)
events = []
for _ in range(100):  # bounded poll (about 2 s) for the NEW event of our datagram
    events += [(e.kind, str(e.entry.orig.src), e.entry.orig.sport) for e in ev.read()]
    if ("new", "198.18.0.1", 40001) in events:
        break
    time.sleep(0.02)
ct = Conntrack()
ev.ignore_sender(ct.portid())
found = ct.get(t)
back = Tuple5(17, t.dst, t.src, 5353, 40001)  # the reply direction's tuple
by_reply = ct.get(back)
absent = ct.get(Tuple5(17, t.src, t.dst, 40003, 5353))
sent = ct.refresh_many([(t, False, 0, 1234)])
gone = Tuple5(17, t.src, t.dst, 40002, 5353)
ct.refresh_many([(gone, False, 0, 99)], [b"udp-gone"])
ct.set_liberal(Tuple5(6, t.src, t.dst, 1, 2), False, 0, b"tcp-gone")
# Another updater (not the agent's own socket) changes the same entry.
Conntrack().refresh_many([(t, False, 0, 1500)])
updates = []
for _ in range(50):  # bounded poll (about 1 s) for the other updater's event
    updates += [e.entry.timeout for e in ev.read() if e.kind == "update"]
    if any(u > 1234 for u in updates):
        break
    time.sleep(0.02)
print(json.dumps({"events": events, "found": found is not None and not found[1],
                  "by_reply": by_reply is not None and by_reply[1]
                  and by_reply[0].orig == found[0].orig, "absent": absent,
                  "sent": sent, "failures": ct.update_failures, "updates": updates,
                  "gone": [g.decode() for g in ct.take_gone()]}))
"""


def test_events_get_refresh_against_the_kernel(bpf_object: object) -> None:
    need_root()
    with namespaces("ct") as (ns,):
        tracked_sender(ns)
        proc = ns.run([sys.executable, "-c", PROBE])
        got = json.loads(proc.stdout)
        assert ("new", "198.18.0.1", 40001) in [tuple(e) for e in got["events"]]
        assert got["found"] is True
        assert got["by_reply"] is True  # found by its reply tuple, told apart
        assert got["absent"] is None
        # The agent's own refresh (1234 s) caused no event it reads; the
        # other updater's did.
        assert got["updates"] and all(u > 1234 for u in got["updates"]), got["updates"]
        assert got["sent"] == 1 and got["failures"] == 0
        # Neither the second UDP tuple nor the TCP one has an entry: their
        # tags come back as gone, at once (the kernel answers inside sendmsg).
        assert got["gone"] == ["udp-gone", "tcp-gone"]
        listing = ns.run("conntrack -L -p udp --sport 40001").stdout
        timeout = int(listing.split()[2])
        # The refreshes set 1234 s, then 1500 s; the kernel alone would give this unreplied
        # entry its own UDP timeout (30 s by default), whatever time has passed.
        own = int(ns.run("sysctl -n net.netfilter.nf_conntrack_udp_timeout").stdout)
        assert own < timeout <= 1500, (own, listing)


SPLIT = r"""
import json, socket, subprocess, time
from offloader.ctevents import CtEvents
ev = CtEvents()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("198.18.0.1", 40011))
s.sendto(b"x", ("198.18.0.2", 5353))
seen = {"read": [], "read_destroys": []}
def poll(read, kind, tries):
    for _ in range(tries):  # bounded (20 ms apart)
        got = [(e.kind, e.entry.orig.sport if e.entry else None) for e in getattr(ev, read)()]
        seen[read] += got
        if any(k == kind for k, _ in got):
            return
        time.sleep(0.02)
poll("read", "new", 100)
subprocess.run(["conntrack", "-D", "-p", "udp", "--sport", "40011"], capture_output=True)
poll("read", "destroy", 25)  # never comes on this socket: 0.5 s
poll("read_destroys", "destroy", 100)
print(json.dumps(seen))
"""


def test_destroy_events_come_on_a_socket_of_their_own(bpf_object: object) -> None:
    """The kernel's NEW event comes to ``read``, the DESTROY that
    `conntrack -D` causes only to ``read_destroys`` (its own socket)."""
    need_root()
    with namespaces("ctsplit") as (ns,):
        tracked_sender(ns)
        got = json.loads(ns.run([sys.executable, "-c", SPLIT]).stdout)
        assert ["new", 40011] in got["read"], got
        assert all(kind != "destroy" for kind, _ in got["read"]), got
        assert [k for k, _ in got["read_destroys"]] == ["destroy"], got
