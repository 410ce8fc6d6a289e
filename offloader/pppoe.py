"""Which PPPoE session a ppp device carries.

The kernel lists the sessions of this network namespace in /proc/net/pppoe
(session id in network order as hex, peer MAC, Ethernet device) but not the
ppp device each belongs to. pppd's PPPoE plugin tells its ip-up scripts the
ppp interface name (first argument) and the peer MAC (MACREMOTE); our
`ebpf-offloader-ppp-up` hook records that pair under RUN_DIR, which joins the
two. With a single session on an Ethernet device no hook is needed. No IPv6
on the PPP link is needed either (bpfw needs it to find the peer).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc/net/pppoe")
RUN_DIR = Path(os.environ.get("EBPF_OFFLOADER_RUN_DIR", "/var/run/ebpf-offloader/ppp"))


@dataclass(frozen=True, slots=True)
class Session:
    sid: int
    peer: bytes  # peer (access concentrator) MAC
    device: str  # Ethernet device the session runs on


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", "").replace("-", ""))


def sessions(proc: Path = PROC) -> list[Session]:
    """Sessions in /proc/net/pppoe; empty when PPPoE is not loaded."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines[1:]:  # "Id       Address              Device"
        parts = line.split()
        if len(parts) != 3:
            continue
        # The kernel prints the network-order u16 as a host integer (%08X).
        sid = socket.ntohs(int(parts[0], 16) & 0xFFFF)
        out.append(Session(sid, _mac(parts[1]), parts[2]))
    return out


def recorded_peer(ppp_ifname: str, run_dir: Path = RUN_DIR) -> bytes | None:
    """The peer MAC the ip-up hook recorded for ``ppp_ifname``."""
    try:
        return _mac((run_dir / ppp_ifname).read_text().strip())
    except (OSError, ValueError):
        return None


def session_of(ppp_ifname: str, proc: Path = PROC, run_dir: Path = RUN_DIR) -> Session | None:
    """The session behind a ppp device, or None when it cannot be told."""
    found = sessions(proc)
    peer = recorded_peer(ppp_ifname, run_dir)
    if peer is not None:
        mine = [s for s in found if s.peer == peer]
        if len(mine) == 1:
            return mine[0]
    return found[0] if len(found) == 1 else None


def ppp_of(sid: int, device: str, ppp_names: list[str], proc: Path = PROC,
           run_dir: Path = RUN_DIR) -> str | None:
    """The ppp device carrying session ``sid`` on ``device`` (ingress side)."""
    for name in ppp_names:
        s = session_of(name, proc, run_dir)
        if s is not None and s.sid == sid and s.device == device:
            return name
    return None
