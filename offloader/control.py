"""The agent's control socket: how `status` and `flush` reach a running agent.

An abstract UNIX socket belongs to the network namespace it is bound in, so
each namespace's agent has its own, whether commands run under
``ip netns exec`` (which remounts /sys) or ``nsenter --net`` (which does
not), and agents in different namespaces never collide. Protocol: one JSON
request line (at most MAX_REQUEST bytes), one JSON answer line, then the
agent closes the connection.

Who may talk to whom (SO_PEERCRED on both ends):
  the agent answers root, and members of the configured ``control_group``;
  anyone else gets one refusal line and is closed at once
  the client believes only an agent running as root, and names whoever else
  holds the address (an abstract address has no file mode to protect it)

The server never waits, so the agent's loop never stalls on a client:
  ControlServer.fileno()  an epoll set of our own (listener, clients, a
                          timerfd for deadlines, pidfds of status children);
                          readable when any of them is ready
  _Client                 one connection's state: READ (request bytes) ->
                          QUEUED (waiting for a status child) or an answer
                          -> WRITE (buffered, flushed when writable) -> closed
  deadline                a client that has not been answered within
                          ``deadline`` seconds of connecting is dropped
  bounds                  MAX_CLIENTS connections, MAX_CHILDREN status
                          children; a status child lives CHILD_SECONDS at most
"""

from __future__ import annotations

import ctypes
import enum
import errno
import grp
import json
import logging
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .errors import (
    AgentNotAnswering,
    AgentNotRunning,
    ConfigError,
    ControlAddressHeld,
    ControlRefused,
    OffloadError,
)

log = logging.getLogger(__name__)

ADDRESS = "\0ebpf-offloader/control"
MAX_REQUEST = 4096
MAX_CLIENTS = 64  # connections being read or written at once
MAX_CHILDREN = 4  # status answers being produced at once
DEADLINE_S = 5.0  # from connect to the answer handed over (or the child forked)
CHILD_SECONDS = 60  # a status child that has not finished by then is killed (SIGALRM)
ACCEPT_BATCH = 16  # connections accepted per serve_one()
WRITE_CHUNK = 1 << 18
LISTEN_BACKLOG = 64
PAUSE_S = 1.0  # the listener rests this long after EMFILE/ENOMEM
LOG_EVERY_S = 60.0

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13; not in Python 3.11

Handler = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class PeerCred:
    """The other end of a UNIX socket, as the kernel recorded it (SO_PEERCRED):
    the connecting process for the agent, the listening one for a client."""

    pid: int
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"uid {self.uid} (pid {self.pid})"


def peer_cred(sock: socket.socket) -> PeerCred:
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("iII"))
    pid, uid, gid = struct.unpack("iII", data)
    return PeerCred(pid, uid, gid)


def peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """The peer's supplementary groups (SO_PEERGROUPS); () where unknown."""
    for count in (64, 65536):
        try:
            data = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * count)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            return ()
        return struct.unpack(f"{len(data) // 4}I", data[: len(data) // 4 * 4])
    return ()


def group_id(name: str) -> int:
    """The gid of group ``name``; a ConfigError naming ``control_group`` if none."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"no such group {name!r}", option="control_group") from None


class _State(enum.Enum):
    READ = "read"  # gathering the request line
    QUEUED = "queued"  # a forked answer waits for a free child slot
    WRITE = "write"  # flushing the answer


class _Client:
    """One connection and what it is waiting for."""

    __slots__ = ("sock", "fd", "cred", "deadline", "state", "inbuf", "request", "out", "sent")

    def __init__(self, sock: socket.socket, cred: PeerCred, deadline: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.cred = cred
        self.deadline = deadline
        self.state = _State.READ
        self.inbuf = b""
        self.request: dict[str, Any] = {}
        self.out = b""
        self.sent = 0


class _Timer:
    """A timerfd (CLOCK_MONOTONIC): readable once the armed time has come.
    Through libc: os.timerfd_create is Python 3.13."""

    CLOCK_MONOTONIC = 1
    TFD_NONBLOCK = os.O_NONBLOCK
    TFD_CLOEXEC = os.O_CLOEXEC

    class _Spec(ctypes.Structure):
        _fields_ = [("interval_sec", ctypes.c_long), ("interval_nsec", ctypes.c_long),
                    ("value_sec", ctypes.c_long), ("value_nsec", ctypes.c_long)]

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
        self._libc.timerfd_create.restype = ctypes.c_int
        self._libc.timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int,
                                               ctypes.POINTER(self._Spec), ctypes.c_void_p]
        self._libc.timerfd_settime.restype = ctypes.c_int
        fd = self._libc.timerfd_create(self.CLOCK_MONOTONIC, self.TFD_NONBLOCK | self.TFD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OffloadError(f"timerfd_create: {os.strerror(err)}")
        self.fd: int = fd
        self.armed_at = 0.0  # the monotonic time it fires (0: disarmed)

    def arm(self, when: float) -> None:
        """Fire at monotonic time ``when`` (0 disarms)."""
        if when == self.armed_at:
            return
        spec = self._Spec(0, 0, 0, 0)
        if when:
            delay = max(when - time.monotonic(), 0.0)
            spec.value_sec = int(delay)
            spec.value_nsec = int((delay - int(delay)) * 1e9) or (0 if spec.value_sec else 1)
        if self._libc.timerfd_settime(self.fd, 0, ctypes.byref(spec), None) < 0:
            raise OffloadError(f"timerfd_settime: {os.strerror(ctypes.get_errno())}")
        self.armed_at = when

    def clear(self) -> None:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass
        self.armed_at = 0.0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ControlServer:
    """The agent's end. Register :meth:`fileno` for reading in the agent's
    selector and call :meth:`serve_one` when it is readable (calling it at
    any other time is harmless: it never waits)."""

    def __init__(self, handler: Handler, address: str = ADDRESS, *,
                 fork_for: Iterable[str] | None = None, group: str | None = None,
                 deadline: float = DEADLINE_S, max_clients: int = MAX_CLIENTS,
                 max_children: int = MAX_CHILDREN, root_uid: int = 0) -> None:
        self.handler = handler
        self.root_uid = root_uid  # always answered (tests pass their own uid)
        self.address = address
        self.fork_for = frozenset(fork_for or ())
        self.deadline = deadline
        self.max_clients = max_clients
        self.max_children = max_children
        self.gid: int | None = None
        self.group = ""
        self.set_group(group)
        self.clients: dict[int, _Client] = {}
        self.children: dict[int, int] = {}  # pid -> pidfd (-1: none, reaped by polling)
        self._pidfds: dict[int, int] = {}  # pidfd -> pid
        self.counters = {"accepted": 0, "refused": 0, "busy": 0, "timed_out": 0,
                         "forked": 0, "fork_failed": 0}
        self._logged: dict[str, float] = {}
        self._paused_until = 0.0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(address)
        except OSError as exc:
            self.sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise held_address_error(address, root_uid) from exc
            raise OffloadError(f"control socket: {exc}") from exc
        self.sock.listen(LISTEN_BACKLOG)
        self.sock.setblocking(False)
        self._ep = select.epoll()
        self._timer = _Timer()
        self._ep.register(self.sock.fileno(), select.EPOLLIN)
        self._ep.register(self._timer.fd, select.EPOLLIN)

    def set_group(self, group: str | None) -> None:
        """Also answer members of ``group`` (None or "": root only)."""
        self.gid = group_id(group) if group else None
        self.group = group or ""

    def fileno(self) -> int:
        return self._ep.fileno()

    # -- the loop's entry point ------------------------------------------------------
    def serve_one(self) -> None:
        """Do whatever is ready now: accept, read, answer, flush, expire, reap."""
        for fd, events in self._ep.poll(0, 64):
            if fd == self.sock.fileno():
                self._accept()
            elif fd == self._timer.fd:
                self._timer.clear()
            elif fd in self._pidfds:
                self._reap(self._pidfds[fd])
            else:
                client = self.clients.get(fd)
                if client is not None:
                    self._service(client, events)
        now = time.monotonic()
        self._expire(now)
        if self._paused_until and now >= self._paused_until:
            self._paused_until = 0.0
            self._ep.modify(self.sock.fileno(), select.EPOLLIN)
        for pid, pidfd in list(self.children.items()):
            if pidfd < 0:
                self._reap(pid)
        self._start_queued()
        self._arm()

    def stats(self) -> dict[str, int]:
        """Counters for the status report: connections accepted, refused
        (credentials), turned away (busy), dropped at their deadline, status
        children forked and forks that failed; clients and children now."""
        return {**self.counters, "clients": len(self.clients), "children": len(self.children)}

    # -- connections -------------------------------------------------------------------
    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # The backlog stays readable: rest rather than spin.
                    self._ep.modify(self.sock.fileno(), 0)
                    self._paused_until = time.monotonic() + PAUSE_S
                    self._note("accept", f"control socket: accept: {exc}; pausing")
                    return
                continue  # ECONNABORTED and the like: that one client is gone
            sock.setblocking(False)
            try:
                cred = peer_cred(sock)
            except OSError:
                sock.close()
                continue
            if not self._allowed(sock, cred):
                self.counters["refused"] += 1
                self._note("refused", f"control socket: refused {cred}")
                self._refuse(sock, self._refusal(cred), denied=True)
                continue
            if len(self.clients) >= self.max_clients:
                self.counters["busy"] += 1
                self._note("busy", f"control socket: {len(self.clients)} clients, turning one away")
                self._refuse(sock, f"busy: {len(self.clients)} clients are waiting; try again")
                continue
            self.counters["accepted"] += 1
            client = _Client(sock, cred, time.monotonic() + self.deadline)
            self.clients[client.fd] = client
            self._ep.register(client.fd, select.EPOLLIN)

    def _allowed(self, sock: socket.socket, cred: PeerCred) -> bool:
        if cred.uid == self.root_uid:
            return True
        if self.gid is None:
            return False
        return cred.gid == self.gid or self.gid in peer_groups(sock)

    def _refusal(self, cred: PeerCred) -> str:
        who = "root" + (f" and members of group {self.group}" if self.group else "")
        return f"permission denied: this agent answers only {who}; uid {cred.uid} is not allowed"

    @staticmethod
    def _refuse(sock: socket.socket, message: str, *, denied: bool = False) -> None:
        """One error line into a fresh socket (its buffer is empty: the send
        does not wait), then close."""
        answer: dict[str, Any] = {"error": message}
        if denied:
            answer["denied"] = True
        try:
            sock.send(json.dumps(answer).encode() + b"\n", socket.MSG_NOSIGNAL)
        except OSError:
            pass
        sock.close()

    def _service(self, client: _Client, events: int) -> None:
        if client.state is _State.READ and events & (select.EPOLLIN | select.EPOLLHUP
                                                     | select.EPOLLERR):
            self._read(client)
        elif client.state is _State.WRITE and events & (select.EPOLLOUT | select.EPOLLHUP
                                                        | select.EPOLLERR):
            self._write(client)
        elif events & (select.EPOLLHUP | select.EPOLLERR):
            self._drop(client)  # gone while queued

    def _read(self, client: _Client) -> None:
        try:
            chunk = client.sock.recv(MAX_REQUEST + 1 - len(client.inbuf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        client.inbuf += chunk
        line, newline, _ = client.inbuf.partition(b"\n")
        if not newline:
            if len(client.inbuf) > MAX_REQUEST:
                self._answer(client, {"error": f"request longer than {MAX_REQUEST} bytes"})
                return
            if chunk:
                return  # more to come
            if not client.inbuf:
                self._drop(client)  # connected and left without a word
                return
        try:
            request = json.loads(line or b"{}")
        except ValueError as exc:
            self._answer(client, {"error": f"malformed request: {exc}"})
            return
        if not isinstance(request, dict):
            self._answer(client, {"error": "request must be a JSON object"})
            return
        if request.get("cmd") in self.fork_for:
            client.state = _State.QUEUED
            client.request = request
            client.inbuf = b""
            self._ep.modify(client.fd, 0)  # hang-ups are still reported
            return
        self._answer(client, self._handle(request))

    def _answer(self, client: _Client, answer: dict[str, Any]) -> None:
        client.state = _State.WRITE
        client.out = json.dumps(answer).encode() + b"\n"
        client.sent = 0
        client.inbuf = b""
        self._write(client)
        if client.fd in self.clients and client.state is _State.WRITE:
            self._ep.modify(client.fd, select.EPOLLOUT)

    def _write(self, client: _Client) -> None:
        view = memoryview(client.out)[client.sent : client.sent + WRITE_CHUNK]
        try:
            client.sent += client.sock.send(view, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        if client.sent >= len(client.out):
            self._drop(client)

    def _drop(self, client: _Client) -> None:
        if self.clients.pop(client.fd, None) is None:
            return
        try:
            # Unregister first: a forked child may still hold a copy of the
            # fd, and epoll forgets a file only when every copy is closed.
            self._ep.unregister(client.fd)
        except OSError:
            pass
        client.sock.close()

    def _expire(self, now: float) -> None:
        for client in [c for c in self.clients.values() if c.deadline <= now]:
            self.counters["timed_out"] += 1
            self._note("timed_out", f"control socket: dropped {client.cred} after "
                                    f"{self.deadline:g} s ({client.state.value})")
            if client.state is not _State.WRITE:
                try:  # nothing was written yet: the socket has room for one line
                    client.sock.send(b'{"error": "timed out"}\n', socket.MSG_NOSIGNAL)
                except OSError:
                    pass
            self._drop(client)

    def _arm(self) -> None:
        times = [c.deadline for c in self.clients.values()]
        if self._paused_until:
            times.append(self._paused_until)
        if any(pidfd < 0 for pidfd in self.children.values()):
            times.append(time.monotonic() + 1.0)  # no pidfd: poll for the child's end
        self._timer.arm(min(times) if times else 0.0)

    # -- answers -------------------------------------------------------------------------
    def _handle(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.handler(request)
        except (ValueError, OffloadError) as exc:
            return {"error": str(exc)}
        except Exception as exc:  # noqa: BLE001 (a bug in one answer must not stop the agent)
            log.exception("control request %r failed", request.get("cmd"))
            return {"error": f"internal error: {exc}"}

    def _start_queued(self) -> None:
        """Fork status children for queued clients while slots are free.

        The child produces the answer, so a report on 100,000 flows (tens of
        megabytes of Python objects) never grows the agent's heap, and a slow
        reader holds only the child."""
        for client in [c for c in self.clients.values() if c.state is _State.QUEUED]:
            if len(self.children) >= self.max_children:
                return
            try:
                pid = os.fork()
            except OSError as exc:
                self.counters["fork_failed"] += 1
                self._note("fork", f"control socket: cannot fork for status: {exc}")
                self._answer(client, {"error": f"cannot fork to answer: {exc}"})
                continue
            if pid == 0:
                self._child(client)  # never returns
            self.counters["forked"] += 1
            self._add_child(pid)
            self._drop(client)  # the parent's copy; the child answers

    def _child(self, client: _Client) -> None:
        code = 1
        try:
            try:
                signal.set_wakeup_fd(-1)  # the agent's wake-up pipe is not ours
            except ValueError:
                pass
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM):
                signal.signal(sig, signal.SIG_DFL)
            signal.alarm(CHILD_SECONDS)
            # Nothing of the server but this one client: close (never
            # unregister: the epoll set is shared with the parent).
            for other in self.clients.values():
                if other is not client:
                    other.sock.close()
            for pidfd in self._pidfds:
                os.close(pidfd)
            self.sock.close()
            self._ep.close()
            self._timer.close()
            client.sock.setblocking(True)
            client.sock.sendall(json.dumps(self._handle(client.request)).encode() + b"\n")
            code = 0
        finally:
            os._exit(code)

    def _add_child(self, pid: int) -> None:
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pidfd = -1
        self.children[pid] = pidfd
        if pidfd >= 0:
            self._pidfds[pidfd] = pid
            self._ep.register(pidfd, select.EPOLLIN)

    def _reap(self, pid: int) -> None:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if not done:
            return
        pidfd = self.children.pop(pid, -1)
        if pidfd >= 0:
            del self._pidfds[pidfd]
            try:
                self._ep.unregister(pidfd)
            except OSError:
                pass
            os.close(pidfd)

    def reap(self) -> None:
        """Collect finished status children (serve_one does this too)."""
        for pid in list(self.children):
            self._reap(pid)

    def _note(self, what: str, message: str) -> None:
        """Log ``message`` at most once a minute per kind of event."""
        now = time.monotonic()
        if now - self._logged.get(what, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._logged[what] = now
            log.warning("%s (%s)", message, ", ".join(f"{k} {v}" for k, v in self.counters.items()))

    def close(self) -> None:
        for client in list(self.clients.values()):
            self._drop(client)
        for pid in list(self.children):
            self._reap(pid)
        for pidfd in list(self._pidfds):
            os.close(pidfd)
        self._pidfds.clear()
        self.sock.close()
        self._ep.close()
        self._timer.close()


# --------------------------------------------------------------------------
# Who holds the address


def held_address_error(address: str = ADDRESS, root_uid: int = 0) -> OffloadError:
    """Why ``address`` cannot be bound: a root agent, or someone else (named)."""
    holder = address_holder(address)
    name = address.lstrip("\0")
    if holder is not None and holder.uid == root_uid:
        return OffloadError(f"another agent already runs in this network namespace (pid {holder.pid})")
    who = str(holder) if holder else "a process this agent cannot identify"
    return ControlAddressHeld(
        f"the control address @{name} is held by {who}, not a root agent; refusing to start "
        f"(an abstract address cannot be taken back: stop that process first)")


def address_holder(address: str = ADDRESS) -> PeerCred | None:
    """The credentials of whoever listens on ``address``, or, for a socket
    that is bound but does not listen, its owner found through /proc."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(address)
            return peer_cred(probe)
        except OSError:  # not listening, or its backlog is full
            pass
    return _bound_socket_owner(address)


def _bound_socket_owner(address: str) -> PeerCred | None:
    """Find the process holding an abstract UNIX address: its inode from
    /proc/net/unix, then the process with a descriptor on that inode."""
    wanted = "@" + address.lstrip("\0")
    inodes: set[str] = set()
    try:
        with open("/proc/net/unix") as f:
            next(f, None)
            for line in f:
                parts = line.split()
                if len(parts) >= 8 and parts[7] == wanted:
                    inodes.add(parts[6])
    except OSError:
        return None
    targets = {f"socket:[{i}]" for i in inodes}
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in targets:
                    st = os.stat(f"/proc/{pid}")
                    return PeerCred(int(pid), st.st_uid, st.st_gid)
        except OSError:
            continue
    return None


# --------------------------------------------------------------------------
# The client's end


def request(cmd: str, timeout: float = 10.0, address: str = ADDRESS, *, root_uid: int = 0,
            **args: Any) -> dict[str, Any]:
    """Send one command to the agent of this network namespace.

    Only an agent running as root (``root_uid``; tests pass their own) is
    believed: anyone can bind an abstract address first, so the listener's
    credentials are checked before a word is sent."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    with sock:
        holder = _connect(sock, address, root_uid)
        try:
            data = _exchange(sock, json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        except TimeoutError as exc:
            raise AgentNotAnswering(f"the agent (pid {holder.pid}) did not answer within "
                                    f"{timeout:g} s: it is stopped or stuck") from exc
        except OSError as exc:
            raise OffloadError(f"talking to the agent: {exc}") from exc
    return _answer(data)


def _connect(sock: socket.socket, address: str, root_uid: int) -> PeerCred:
    """Connect, and believe only a listener running as ``root_uid``."""
    try:
        sock.connect(address)
    except ConnectionRefusedError as exc:
        holder = _bound_socket_owner(address)  # bound, not listening: who?
        if holder is not None and holder.uid != root_uid:
            raise ControlAddressHeld(f"the control address is held by {holder}, "
                                     "not a root agent") from exc
        raise AgentNotRunning("no ebpf-offloader agent is running in this network "
                              "namespace") from exc
    except TimeoutError as exc:  # its backlog full: it stopped taking connections
        raise AgentNotAnswering(f"the agent did not take the connection within "
                                f"{sock.gettimeout():g} s: it is stopped or stuck") from exc
    except OSError as exc:
        raise OffloadError(f"cannot reach the agent: {exc}") from exc
    holder = peer_cred(sock)
    if holder.uid != root_uid:
        raise ControlAddressHeld(f"the control address is held by {holder}, not a root agent")
    return holder


def _exchange(sock: socket.socket, line: bytes) -> bytes:
    """Send the request line, read the answer line."""
    chunks: list[bytes] = []
    try:
        sock.sendall(line)
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused at once: its one line is waiting to be read
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            break  # closed with our request unread (a refusal): data came first
        if not chunk:
            break
        chunks.append(chunk)
        if chunk.endswith(b"\n"):
            break
    return b"".join(chunks)


def _answer(data: bytes) -> dict[str, Any]:
    if not data:
        raise OffloadError("the agent closed the connection without answering")
    try:
        answer = json.loads(data)
    except ValueError as exc:
        raise OffloadError("malformed or truncated answer from the agent") from exc
    if not isinstance(answer, dict):
        raise OffloadError("malformed answer from the agent")
    if "error" in answer:
        if answer.get("denied"):
            raise ControlRefused(str(answer["error"]))
        raise OffloadError(f"agent: {answer['error']}")
    return answer
