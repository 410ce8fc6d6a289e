"""The agent's collaborators, opened in order and closed whatever happens.

The control socket comes first: binding its address is the single-agent
lock, taken before anything pinned or attached is touched, so a refused
second start changes nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2.iproute import IPRoute

from .bpfobj import is_bpffs
from .config import Settings
from .conntrack import Conntrack
from .control import ControlServer
from .ctevents import CtEvents
from .datapath import BPFFS, Datapath, find_object, in_root_netns, netns_pin_dir
from .errors import OffloadError
from .netwatch import NetWatcher
from .nftwatch import RulesetWatcher
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
    pins: PinGuard
    nft: RulesetWatcher


class PinGuard:
    """A refused start leaves nothing behind: the pin directories this start
    creates go again unless the agent ran (``keep``). Pins found in place were
    another run's, for adoption, and stay."""

    def __init__(self, pin_dir: Path | None) -> None:
        self.keep = False
        self.created: list[Path] = []  # deepest first
        path = pin_dir
        while path is not None and not path.exists():
            self.created.append(path)
            path = path.parent if path.parent != path else None

    def release(self) -> None:
        if self.keep or not self.created:
            return
        shutil.rmtree(self.created[0], ignore_errors=True)
        for path in self.created[1:]:
            with contextlib.suppress(OSError):
                path.rmdir()  # only while empty


# Capability bits (linux/capability.h).
CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39


def effective_caps(status: str = "/proc/self/status") -> int:
    with open(status) as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def check_can_run(*, pin: bool = True) -> None:
    """Refuse at once, with one sentence, what would fail half-way: no
    privileges to load and attach BPF, or (in the root network namespace,
    where the maps are pinned so that a restart adopts the flows) no BPF
    filesystem at /sys/fs/bpf."""
    caps = effective_caps()
    if not caps >> CAP_NET_ADMIN & 1 or not (caps >> CAP_BPF & 1 or caps >> CAP_SYS_ADMIN & 1):
        raise OffloadError("ebpf-offloader run needs root (CAP_BPF or CAP_SYS_ADMIN, and "
                           "CAP_NET_ADMIN) to load and attach its programs")
    if pin and in_root_netns() and not is_bpffs(BPFFS):
        raise OffloadError(f"{BPFFS} is not a BPF filesystem: mount it (mount -t bpf bpf "
                           f"{BPFFS}) so that the flow maps survive a restart of the agent")


def open_parts(stack: contextlib.ExitStack, settings: Settings,
               handler: Callable[[dict[str, Any]], dict[str, Any]], *, pin: bool = True) -> Parts:
    """Open every collaborator, the control socket first: it is the
    single-agent lock, taken before anything pinned or attached is touched.
    Each is closed by ``stack``, also when a later one fails."""
    check_can_run(pin=pin)
    control = ControlServer(handler, fork_for={"status"}, group=settings.control_group or None)
    stack.callback(control.close)
    pin_dir = netns_pin_dir() if pin else None
    pins = PinGuard(pin_dir)
    stack.callback(pins.release)
    dp = Datapath(find_object(settings.object), max_flows=settings.max_flows,
                  pending_flows=settings.pending_flows,
                  drop_entries=settings.early_drop_entries,
                  ring_bytes=settings.event_ring_kib * 1024, pin_dir=pin_dir)
    stack.callback(dp.close)
    resolver = Resolver(IPRoute())
    stack.callback(resolver.close)
    ct = Conntrack()
    stack.callback(ct.close)
    # The event socket's buffer (the kernel doubles it: 8 MiB, some 6,500
    # events of 1.3 KB each; memory only while the agent is behind; an
    # overflow costs a reconcile, not correctness). EBPF_OFFLOADER_CT_RCVBUF
    # sets it (a test hook: a small one makes an event storm overflow it).
    ct_events = CtEvents(int(os.environ.get("EBPF_OFFLOADER_CT_RCVBUF", 4 << 20)))
    stack.callback(ct_events.close)
    ct_events.ignore_sender(ct.portid())  # the echoes of the agent's own updates
    rt_sock = rt_event_socket()
    stack.callback(rt_sock.close)
    parser = IPRoute()
    stack.callback(parser.close)
    nft = RulesetWatcher()
    stack.callback(nft.close)
    return Parts(control, dp, resolver, ct, ct_events, NetWatcher(rt_sock, resolver, parser),
                 pins, nft)
