"""The control socket's server state machine and the client's checks, without root.

Each test binds its own abstract address (no privilege needed) and drives
``serve_one()`` the way the agent's loop does: whenever ``fileno()`` is
readable. A test where the server waited on a client would hang; the alarm
fixture turns that into a failure.
"""

from __future__ import annotations

import grp
import json
import os
import secrets
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from offloader import control
from offloader.control import MAX_REQUEST, ControlServer, peer_cred, peer_groups, request
from offloader.errors import AgentNotRunning, ControlAddressHeld, ControlRefused, OffloadError

ME = os.geteuid()
OTHER = ME + 1  # a uid that is not ours: the server's "root" in refusal tests


@pytest.fixture(autouse=True)
def alarm() -> Iterator[None]:
    """A server call that blocks fails the test instead of hanging it."""

    def expired(_sig: int, _frame: object) -> None:
        raise AssertionError("a call blocked (alarm)")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture
def address() -> str:
    return f"\0ofl-test-{secrets.token_hex(6)}"


def echo(req: dict[str, Any]) -> dict[str, Any]:
    return {"echo": req, "pid": os.getpid()}


@pytest.fixture
def make(address: str) -> Iterator[Callable[..., ControlServer]]:
    servers: list[ControlServer] = []

    def build(handler: Callable[[dict[str, Any]], dict[str, Any]] = echo,
              **kw: Any) -> ControlServer:
        kw.setdefault("root_uid", ME)
        srv = ControlServer(handler, address, **kw)
        servers.append(srv)
        return srv

    yield build
    for srv in servers:
        srv.close()


def connect(address: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(address)
    s.setblocking(False)
    return s


def pump(srv: ControlServer, until: Callable[[], Any], seconds: float = 5.0) -> Any:
    """Run the server as the agent's loop would (on readiness) until ``until()``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = until()
        if value:
            return value
        if select.select([srv], [], [], 0.05)[0]:
            srv.serve_one()
    return until()


class Reader:
    """A client's receive side, read without waiting."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = b""
        self.eof = False

    def poll(self) -> bool:
        while not self.eof:
            try:
                chunk = self.sock.recv(1 << 16)
            except BlockingIOError:
                break
            except ConnectionResetError:
                self.eof = True
                break
            if not chunk:
                self.eof = True
            self.data += chunk
        return self.eof

    def answer(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.data)
        return result


def ask(srv: ControlServer, address: str, line: bytes) -> dict[str, Any]:
    sock = connect(address)
    sock.send(line)
    r = Reader(sock)
    assert pump(srv, r.poll), "no answer"
    sock.close()
    return r.answer()


def test_answers_a_request(make: Callable[..., ControlServer], address: str) -> None:
    srv = make()
    assert ask(srv, address, b'{"cmd": "status", "limit": 3}\n')["echo"] == {"cmd": "status",
                                                                            "limit": 3}
    assert not srv.clients


def test_request_in_pieces_is_answered_after_the_newline(
        make: Callable[..., ControlServer], address: str) -> None:
    srv = make()
    sock = connect(address)
    r = Reader(sock)
    for byte in b'{"cmd": "flush"}':
        sock.send(bytes([byte]))
        srv.serve_one()
        srv.serve_one()
        r.poll()
        assert not r.data, "answered before the request was complete"
    sock.send(b"\n")
    assert pump(srv, r.poll)
    assert r.answer()["echo"] == {"cmd": "flush"}


def test_silent_clients_do_not_hold_up_others(
        make: Callable[..., ControlServer], address: str) -> None:
    srv = make(deadline=60)
    silent = [connect(address) for _ in range(50)]
    half = connect(address)
    half.send(b'{"cmd": "st')  # a request that never finishes
    assert ask(srv, address, b'{"cmd": "status"}\n')["echo"]["cmd"] == "status"
    assert len(srv.clients) == 51  # still waiting for their requests, not dropped
    for s in (*silent, half):
        s.close()
    assert pump(srv, lambda: not srv.clients), "hung-up clients were not forgotten"


def test_deadline_drops_a_silent_client(make: Callable[..., ControlServer],
                                        address: str) -> None:
    srv = make(deadline=0.3)
    sock = connect(address)
    srv.serve_one()
    assert len(srv.clients) == 1
    r = Reader(sock)
    # No client activity: only the server's own timer can make fileno() readable.
    assert pump(srv, r.poll), "the silent client was never dropped"
    assert r.answer() == {"error": "timed out"}
    assert srv.stats()["timed_out"] == 1 and not srv.clients


def test_request_too_long(make: Callable[..., ControlServer], address: str) -> None:
    srv = make()
    answer = ask(srv, address, b"x" * (MAX_REQUEST + 100))
    assert "longer than" in answer["error"]


@pytest.mark.parametrize("line", [b"not json\n", b"[1, 2]\n"])
def test_malformed_request(make: Callable[..., ControlServer], address: str,
                           line: bytes) -> None:
    assert "error" in ask(make(), address, line)


def test_client_that_leaves_without_a_word(make: Callable[..., ControlServer],
                                           address: str) -> None:
    calls: list[dict[str, Any]] = []
    srv = make(lambda req: calls.append(req) or {})
    connect(address).close()
    assert pump(srv, lambda: srv.stats()["accepted"] == 1 and not srv.clients)
    assert calls == []


def test_big_answer_is_flushed_as_the_reader_reads(
        make: Callable[..., ControlServer], address: str) -> None:
    blob = secrets.token_hex(2_000_000)  # 4 MB: far beyond one socket buffer
    srv = make(lambda req: {"blob": blob}, deadline=60)
    slow = connect(address)
    slow.send(b'{"cmd": "flush"}\n')
    srv.serve_one()
    assert len(srv.clients) == 1  # buffered, waiting for the reader
    # The loop is free meanwhile: another client is answered.
    assert ask(srv, address, b'{"cmd": "x"}\n') == {"blob": blob}
    r = Reader(slow)
    assert pump(srv, r.poll, seconds=15)
    assert r.answer() == {"blob": blob}


def test_slow_reader_is_dropped_at_its_deadline(
        make: Callable[..., ControlServer], address: str) -> None:
    srv = make(lambda req: {"blob": "y" * 3_000_000}, deadline=0.3)
    slow = connect(address)
    slow.send(b'{"cmd": "flush"}\n')
    assert pump(srv, lambda: srv.stats()["timed_out"] == 1)
    assert not srv.clients
    slow.close()


def test_bounded_clients(make: Callable[..., ControlServer], address: str) -> None:
    srv = make(max_clients=3, deadline=60)
    held = [connect(address) for _ in range(3)]
    pump(srv, lambda: len(srv.clients) == 3)
    answer = ask(srv, address, b'{"cmd": "status"}\n')
    assert answer["error"].startswith("busy")
    assert srv.stats()["busy"] == 1
    for s in held:
        s.close()


def test_status_is_answered_by_a_child(make: Callable[..., ControlServer],
                                       address: str) -> None:
    srv = make(fork_for={"status"})
    answer = ask(srv, address, b'{"cmd": "status"}\n')
    assert answer["pid"] != os.getpid()
    assert ask(srv, address, b'{"cmd": "flush"}\n')["pid"] == os.getpid()
    assert pump(srv, lambda: not srv.children), "status child never reaped"


def test_child_holds_only_its_own_client(make: Callable[..., ControlServer],
                                         address: str) -> None:
    fds: dict[str, int] = {}

    def report(req: dict[str, Any]) -> dict[str, Any]:
        def is_open(fd: int) -> bool:
            try:
                os.fstat(fd)
            except OSError:
                return False
            return True

        return {name: is_open(fd) for name, fd in fds.items()}

    srv = make(report, fork_for={"status"}, deadline=60)
    other = connect(address)
    pump(srv, lambda: srv.clients)
    fds.update(listener=srv.sock.fileno(), epoll=srv.fileno(),
               other=next(iter(srv.clients)))
    answer = ask(srv, address, b'{"cmd": "status"}\n')
    assert answer == {"listener": False, "epoll": False, "other": False}
    # ... and the parent's are untouched: the waiting client is still served.
    other.send(b'{"cmd": "flush"}\n')  # answered in the parent
    r = Reader(other)
    assert pump(srv, r.poll)
    assert r.answer() == {"listener": True, "epoll": True, "other": True}


def test_status_children_are_bounded(make: Callable[..., ControlServer],
                                     address: str) -> None:
    srv = make(fork_for={"status"}, max_children=0, deadline=60)
    sock = connect(address)
    sock.send(b'{"cmd": "status"}\n')
    pump(srv, lambda: srv.stats()["accepted"] == 1)
    srv.serve_one()
    assert srv.stats()["forked"] == 0 and len(srv.clients) == 1  # queued
    sock.close()  # a queued client that hangs up is forgotten
    assert pump(srv, lambda: not srv.clients)


def test_fork_failure_answers_an_error(make: Callable[..., ControlServer], address: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    srv = make(fork_for={"status"})

    def no_fork() -> int:
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(control.os, "fork", no_fork)
    assert "cannot fork" in ask(srv, address, b'{"cmd": "status"}\n')["error"]


def test_handler_errors_become_answers(make: Callable[..., ControlServer],
                                       address: str) -> None:
    def broken(req: dict[str, Any]) -> dict[str, Any]:
        if req.get("cmd") == "flush":
            raise OffloadError("unknown command 'flush'")
        raise KeyError("bug")

    srv = make(broken)
    assert ask(srv, address, b'{"cmd": "flush"}\n') == {"error": "unknown command 'flush'"}
    assert "internal error" in ask(srv, address, b'{"cmd": "x"}\n')["error"]


# -- credentials ---------------------------------------------------------------------


def test_peer_credentials_of_a_socketpair() -> None:
    a, b = socket.socketpair()
    with a, b:
        cred = peer_cred(a)
        assert (cred.pid, cred.uid, cred.gid) == (os.getpid(), os.geteuid(), os.getegid())
        assert set(peer_groups(a)) >= set(os.getgroups())


def test_other_users_are_refused(make: Callable[..., ControlServer], address: str) -> None:
    calls: list[dict[str, Any]] = []
    srv = make(lambda req: calls.append(req) or {}, root_uid=OTHER)
    answer = ask(srv, address, b'{"cmd": "flush"}\n')
    assert answer["denied"] is True
    assert f"uid {ME} is not allowed" in answer["error"]
    assert calls == [] and srv.stats()["refused"] == 1 and not srv.clients


def test_request_reports_a_refusal(make: Callable[..., ControlServer], address: str) -> None:
    srv = make(root_uid=OTHER)
    done = threading.Event()
    t = threading.Thread(target=lambda: pump(srv, done.is_set))
    t.start()
    try:
        with pytest.raises(ControlRefused, match="answers only root"):
            request("flush", address=address, root_uid=ME)
    finally:
        done.set()
        t.join()


def test_members_of_the_control_group_are_answered(make: Callable[..., ControlServer],
                                                   address: str) -> None:
    group = grp.getgrgid(os.getegid()).gr_name
    srv = make(root_uid=OTHER, group=group)
    assert ask(srv, address, b'{"cmd": "status"}\n')["echo"] == {"cmd": "status"}
    srv.set_group(None)
    assert ask(srv, address, b'{"cmd": "status"}\n')["denied"] is True


def test_unknown_control_group_is_a_config_error(address: str) -> None:
    from offloader.errors import ConfigError

    with pytest.raises(ConfigError, match="control_group"):
        ControlServer(echo, address, group="no-such-group-ofl")


def test_request_trusts_only_a_root_agent(make: Callable[..., ControlServer],
                                          address: str) -> None:
    calls: list[dict[str, Any]] = []
    make(lambda req: calls.append(req) or {})
    # Our own server stands in for a squatter: its uid is not the agent's.
    with pytest.raises(ControlAddressHeld, match=f"held by uid {ME} \\(pid {os.getpid()}\\), "
                                                 "not a root agent"):
        request("status", address=address, root_uid=OTHER, timeout=2)
    assert calls == []  # not a word was sent


def test_request_names_a_squatter_that_does_not_listen(address: str) -> None:
    squat = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    squat.bind(address)
    with squat:
        with pytest.raises(ControlAddressHeld, match=f"held by uid {ME}"):
            request("status", address=address, root_uid=OTHER, timeout=2)
        # Held by the agent's own uid but not listening: an agent starting up.
        with pytest.raises(AgentNotRunning):
            request("status", address=address, root_uid=ME, timeout=2)


def test_no_agent(address: str) -> None:
    with pytest.raises(AgentNotRunning, match="no ebpf-offloader agent is running"):
        request("status", address=address)


def test_second_server_says_another_agent_runs(make: Callable[..., ControlServer],
                                               address: str) -> None:
    make()
    with pytest.raises(OffloadError, match="another agent already runs") as info:
        ControlServer(echo, address, root_uid=ME)
    assert not isinstance(info.value, ControlAddressHeld)


def test_server_refuses_to_start_behind_a_squatter(make: Callable[..., ControlServer],
                                                   address: str) -> None:
    make()  # the squatter: our uid, while the agent expects OTHER
    with pytest.raises(ControlAddressHeld, match=f"held by uid {ME} .*not a root agent") as info:
        ControlServer(echo, address, root_uid=OTHER)
    assert "another agent" not in str(info.value)
