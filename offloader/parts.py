"""The agent's collaborators, opened in order and closed whatever happens.

The control socket comes first: binding its address is the single-agent
lock, taken before anything pinned or attached is touched, so a refused
second start changes nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute

from .config import Settings
from .conntrack import Conntrack, CtEvents
from .control import ControlServer
from .datapath import Datapath, find_object, netns_pin_dir
from .netwatch import NetWatcher
from .routing import Resolver, rt_event_socket


@dataclass
class Parts:
    """The agent's collaborators, opened by ``run_agent``."""

    control: ControlServer
    dp: Datapath
    resolver: Resolver
    ct: Conntrack
    ct_events: CtEvents
    net: NetWatcher



def open_parts(stack: contextlib.ExitStack, settings: Settings,
               handler: Callable[[dict[str, Any]], dict[str, Any]], *, pin: bool = True) -> Parts:
    """Open every collaborator, the control socket first: it is the
    single-agent lock, taken before anything pinned or attached is touched.
    Each is closed by ``stack``, also when a later one fails."""
    control = ControlServer(handler, fork_for={"status"}, group=settings.control_group or None)
    stack.callback(control.close)
    dp = Datapath(find_object(settings.object), max_flows=settings.max_flows,
                  pending_flows=settings.pending_flows, pin_dir=netns_pin_dir() if pin else None)
    stack.callback(dp.close)
    resolver = Resolver(IPRoute())
    stack.callback(resolver.close)
    ct = Conntrack()
    stack.callback(ct.close)
    # The event socket's buffer; EBPF_OFFLOADER_CT_RCVBUF shrinks it (a
    # test hook: it makes an event storm overflow it).
    ct_events = CtEvents(int(os.environ.get("EBPF_OFFLOADER_CT_RCVBUF", 4 << 20)))
    stack.callback(ct_events.close)
    rt_sock = rt_event_socket()
    stack.callback(rt_sock.close)
    parser = IPRoute()
    stack.callback(parser.close)
    return Parts(control, dp, resolver, ct, ct_events, NetWatcher(rt_sock, resolver, parser))
