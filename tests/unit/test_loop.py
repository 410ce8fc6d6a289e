"""The event loop's mechanism: sources in order, errors not fatal, the
urgent timer between handlers, signals after the round and restored."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator

import pytest

from offloader.loop import EventLoop


@pytest.fixture
def readable() -> Iterator[list[socket.socket]]:
    """Two sockets with a byte waiting on each."""
    pairs = [socket.socketpair() for _ in range(2)]
    for _, w in pairs:
        w.send(b"x")
    yield [r for r, _ in pairs]
    for r, w in pairs:
        r.close()
        w.close()


def test_sources_run_in_order_and_an_error_stops_nothing(readable: list[socket.socket]) -> None:
    loop, calls = EventLoop(), []

    def first() -> None:
        calls.append("first")
        raise OSError("one source failed")

    def second() -> None:
        calls.append("second")
        loop.stop()

    loop.watch(readable[0].fileno(), first)
    loop.watch(readable[1].fileno(), second)
    loop.run()
    assert calls == ["first", "second"]


def test_the_urgent_timer_beats_between_handlers(readable: list[socket.socket]) -> None:
    loop, calls = EventLoop(), []
    loop.every(lambda: 0.0, lambda: calls.append("beat"), first_in=3600.0, urgent=True)
    loop.every(lambda: 3600.0, lambda: calls.append("sweep"))  # never due here
    loop.watch(readable[0].fileno(), lambda: calls.append("busy"))

    def last() -> None:
        calls.append("last")
        loop.stop()

    loop.watch(readable[1].fileno(), last)
    loop._timers[0].due = 0.0  # overdue from now on
    loop.run()
    assert calls[:4] == ["beat", "busy", "beat", "last"]
    assert "sweep" not in calls


def test_a_signal_is_handled_after_the_round_and_the_old_handler_restored(
        readable: list[socket.socket]) -> None:
    loop, calls = EventLoop(), []

    def source() -> None:
        os.kill(os.getpid(), signal.SIGUSR1)
        calls.append("source")

    def on_usr1() -> None:
        calls.append("signal")
        loop.stop()

    loop.watch(readable[0].fileno(), source)
    loop.watch(readable[1].fileno(), lambda: calls.append("other"))
    loop.on_signal(signal.SIGUSR1, on_usr1)
    before = signal.getsignal(signal.SIGUSR1)
    loop.run()
    assert calls[:3] == ["source", "other", "signal"]
    assert signal.getsignal(signal.SIGUSR1) is before
