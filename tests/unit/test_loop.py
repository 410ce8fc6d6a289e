"""The event loop's mechanism: sources in order, errors not fatal, the
urgent timer between handlers, signals after the round and restored."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator

import pytest

from offloader.loop import EventLoop, ServedBetween


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


def test_a_long_timer_serves_its_ready_sources_between_its_steps(
        readable: list[socket.socket]) -> None:
    """The sweep walks the flow map through ServedBetween: after each batch
    the ring and conntrack handlers run if readable, other sources wait for
    the round, and a handler run there cannot start the walk again."""
    loop, calls = EventLoop(), []
    ring, other = readable

    class Map:
        def batches(self) -> Iterator[int]:
            yield from (1, 2, 3)

        def delete_batch(self, keys: list[bytes]) -> int:
            return len(keys)

    flows = ServedBetween(Map(), loop.serve_ready)

    def on_ring() -> None:
        calls.append("ring")
        ring.recv(1)
        loop.serve_ready()  # nested: nothing

    def sweep() -> None:
        for batch in flows.batches():
            calls.append(f"batch {batch}")
            if batch == 2:
                timer.hurry(0.0)  # asked for again while it runs: kept
        loop.stop()

    loop.watch(ring.fileno(), on_ring)
    loop.watch(other.fileno(), lambda: calls.append("other"))
    timer = loop.every(lambda: 3600.0, sweep, first_in=0.0, serves=(ring.fileno(),))
    loop.serve_ready()  # outside the timer: nothing
    assert calls == []
    loop.run()
    assert calls[:4] == ["batch 1", "ring", "batch 2", "batch 3"]
    assert "other" in calls and calls.count("ring") == 1
    assert flows.delete_batch([b"k"]) == 1  # the rest is the map's own
    assert timer.due <= time.monotonic()
