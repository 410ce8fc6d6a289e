"""Network namespaces for tests: create, run commands in, always remove.

Every test namespace is named with the ``ofltest-`` prefix plus a random
part, so parallel runs never collide and a leftover is easy to spot. Only
198.18.0.0/15 and 2001:db8::/32 are ever configured inside them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shlex
import socket
import subprocess
import threading
from collections.abc import Iterator, Sequence

PREFIX = "ofltest-"
CLONE_NEWNET = 0x40000000


def sh(cmd: str | Sequence[str], *, check: bool = True, timeout: float = 60,
       input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command on the host, capture output, fail with its stderr."""
    args = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


class Netns:
    """One network namespace; ``run`` executes inside it."""

    def __init__(self, role: str):
        self.name = f"{PREFIX}{role}-{secrets.token_hex(3)}"
        sh(["ip", "netns", "add", self.name])
        self.run("ip link set lo up")

    def argv(self, cmd: str | Sequence[str]) -> list[str]:
        args = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, cmd: str | Sequence[str], *, check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        return sh(self.argv(cmd), check=check, timeout=timeout, input=input)

    def popen(self, cmd: str | Sequence[str], **kw: object) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(cmd), text=True, **kw)  # type: ignore[call-overload, no-any-return]

    def sysctl(self, name: str, value: str | int) -> None:
        self.run(["sysctl", "-qw", f"{name}={value}"])

    def ifindex(self, dev: str) -> int:
        return int(self.run(["cat", f"/sys/class/net/{dev}/ifindex"]).stdout)

    def mac(self, dev: str) -> bytes:
        text = self.run(["cat", f"/sys/class/net/{dev}/address"]).stdout.strip()
        return bytes.fromhex(text.replace(":", ""))

    def delete(self) -> None:
        # Killing what still runs inside releases the namespace promptly.
        pids = sh(["ip", "netns", "pids", self.name], check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        sh(["ip", "netns", "del", self.name], check=False)


def veth(a: Netns, a_dev: str, b: Netns, b_dev: str) -> None:
    """A veth pair with one end in each namespace, both up."""
    tmp_a, tmp_b = f"o{secrets.token_hex(4)}", f"o{secrets.token_hex(4)}"
    sh(["ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b])
    sh(["ip", "link", "set", tmp_a, "netns", a.name, "name", a_dev])
    sh(["ip", "link", "set", tmp_b, "netns", b.name, "name", b_dev])
    a.run(f"ip link set {a_dev} up")
    b.run(f"ip link set {b_dev} up")


def tracked_sender(ns: Netns) -> None:
    """``ns`` sends UDP to 198.18.0.2 out of a veth (d0, 198.18.0.1/24, a
    static neighbour), and conntrack tracks its packets: a rule uses it."""
    ns.run("ip link add d0 type veth peer name d1")
    ns.run("ip addr add 198.18.0.1/24 dev d0")
    ns.run("ip link set d0 up")
    ns.run("ip link set d1 up")
    ns.run("ip neigh add 198.18.0.2 lladdr 02:00:00:00:00:02 dev d0")
    ns.run("nft add table inet t")
    ns.run("nft add chain inet t out { type filter hook output priority 0 ; ct state new counter ; }")


@contextlib.contextmanager
def namespaces(*roles: str) -> Iterator[list[Netns]]:
    """Create one namespace per role; remove them all on exit, even on failure."""
    made: list[Netns] = []
    try:
        for role in roles:
            made.append(Netns(role))
        yield made
    finally:
        for ns in made:
            ns.delete()


def leftovers() -> list[str]:
    """Test namespaces that still exist (should be none after a test)."""
    out = sh(["ip", "netns", "list"], check=False).stdout.split("\n")
    return [line.split()[0] for line in out if line.startswith(PREFIX)]


def _setns(fd: int, what: str) -> None:
    # os.setns() needs Python 3.12; OpenWrt and this project target 3.11.
    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns into {what}: {os.strerror(e)}")


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the body with THIS THREAD in the named network namespace (ifindex
    lookups, XDP/TC attach and new sockets resolve there), and come back for
    sure. No process spawn, no mount changes."""
    with open("/proc/thread-self/ns/net") as own, open(f"/run/netns/{name}") as target:
        _setns(target.fileno(), name)
        try:
            yield
        finally:
            _setns(own.fileno(), "the test's namespace")


def inside(ns: Netns) -> contextlib.AbstractContextManager[None]:
    """``in_netns`` for a test namespace."""
    return in_netns(ns.name)


def socket_in(ns: Netns, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket that belongs to ``ns`` (a socket keeps the namespace it was
    made in), made by a short-lived thread so the caller's own thread never
    leaves its namespace."""
    made: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            with inside(ns):
                made.append(socket.socket(family, kind, proto))
        except BaseException as exc:  # handed to the caller
            made.append(exc)

    t = threading.Thread(target=make)
    t.start()
    t.join(timeout=10)
    if not made:
        raise TimeoutError(f"making a socket in {ns.name}")
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]
