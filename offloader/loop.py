"""The mechanism under the agent: one selector, timers, signals, no threads.

Sources are file descriptors with a handler each, run in the order they
were added (the agent relies on it: the ring before conntrack events).
Timers fire when due; an urgent one (the heartbeat) also between two
handlers, so a busy source never starves it. A long timer (the sweep) may
name sources it serves: inside it, ``serve_ready`` (called between its
steps, see ``ServedBetween``) runs their handlers when they are readable,
so a new flow does not wait for the whole sweep. Signals only note themselves
(through the wake-up fd); their handlers run after the round, outside
signal context. A handler's error is logged, never fatal.
"""

from __future__ import annotations

import contextlib
import logging
import math
import selectors
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .errors import OffloadError

log = logging.getLogger(__name__)


def guarded(call: Callable[..., object], *args: object) -> None:
    """``call(*args)``: one flow's or one source's error never stops the
    agent. The arguments are passed, not bound in a partial first: this
    runs for every new flow."""
    try:
        call(*args)
    except (OffloadError, OSError) as exc:
        log.warning("%s", exc)


@dataclass
class Timer:
    interval: Callable[[], float]  # asked again at each firing: a reload may change it
    fire: Callable[[], None]
    due: float
    urgent: bool = False
    serves: tuple[int, ...] = ()  # sources served inside it (EventLoop.serve_ready)

    def hurry(self, within: float) -> None:
        """Fire within ``within`` seconds at the latest (work came early)."""
        self.due = min(self.due, time.monotonic() + within)

    def run_if_due(self, now: float) -> None:
        if now >= self.due:
            self.due = math.inf  # hurried while it fires: the earlier time stays
            guarded(self.fire)
            self.due = min(self.due, time.monotonic() + self.interval())


class EventLoop:
    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._handlers: dict[int, Callable[[], None]] = {}
        self._timers: list[Timer] = []
        self._signal_handlers: dict[int, Callable[[], None]] = {}
        self._signals: list[int] = []
        self._serving: tuple[int, ...] = ()  # the firing timer's ``serves``
        self.stopped = False

    def watch(self, fd: int, handler: Callable[[], None]) -> None:
        self._handlers[fd] = handler
        self._sel.register(fd, selectors.EVENT_READ)

    def unwatch(self, fd: int) -> None:
        self._sel.unregister(fd)
        del self._handlers[fd]

    def every(self, interval: Callable[[], float], fire: Callable[[], None], *,
              first_in: float | None = None, urgent: bool = False,
              serves: tuple[int, ...] = ()) -> Timer:
        """Call ``fire`` every ``interval()`` seconds, first after ``first_in``
        (default: one interval); ``urgent`` ones also fire between handlers;
        inside ``fire``, ``serve_ready`` serves the sources ``serves``."""
        first = interval() if first_in is None else first_in
        timer = Timer(interval, fire, time.monotonic() + first, urgent, serves)
        self._timers.append(timer)
        return timer

    def on_signal(self, signum: int, handler: Callable[[], None]) -> None:
        self._signal_handlers[signum] = handler

    def stop(self) -> None:
        self.stopped = True

    def serve_ready(self) -> None:
        """Inside a timer that serves sources: run the handlers of those
        that are readable now, then the urgent timers that are due. Not
        nested (a handler run here that calls it again gets nothing), and
        nothing outside such a timer: a handler run here must not find the
        timer's own work half done and start it again."""
        fds, self._serving = self._serving, ()
        if not fds:
            return
        try:
            ready = {key.fd for key, _ in self._sel.select(0)}
            for fd in fds:
                if fd in ready and fd in self._handlers:
                    guarded(self._handlers[fd])
            now = time.monotonic()
            for t in self._timers:
                if t.urgent:
                    t.run_if_due(now)
        finally:
            self._serving = fds

    def run(self) -> None:
        """Until ``stop``; the signal handlers and the selector are restored
        and closed however it ends."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(self._sel)
            wake_r, wake_w = (stack.enter_context(s) for s in socket.socketpair())
            wake_r.setblocking(False)
            wake_w.setblocking(False)
            old_fd = signal.set_wakeup_fd(wake_w.fileno())
            stack.callback(signal.set_wakeup_fd, old_fd)
            for sig in self._signal_handlers:
                stack.callback(signal.signal, sig, signal.signal(sig, self._noted))
            self.watch(wake_r.fileno(), lambda: _drain(wake_r))
            while not self.stopped:
                self._round()

    def _round(self) -> None:
        now = time.monotonic()
        for t in self._timers:
            self._serving = t.serves
            t.run_if_due(now)
        self._serving = ()
        timeout = max(0.0, min((t.due for t in self._timers), default=1.0) - time.monotonic())
        ready = {key.fd for key, _ in self._sel.select(timeout)}
        for fd, handler in list(self._handlers.items()):
            if fd in ready:
                guarded(handler)
                now = time.monotonic()
                for t in self._timers:
                    if t.urgent:
                        t.run_if_due(now)
        signals, self._signals = self._signals, []
        for signum in signals:
            guarded(self._signal_handlers[signum])

    def _noted(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)


class ServedBetween:
    """``inner`` (a map), whose ``batches()`` walk calls ``serve`` after each
    batch was handled (when the next is asked for); anything else is
    ``inner``'s own. The sweep walks the flow map through it: a pass over
    10,000 flows held the loop for tens of milliseconds, and every new flow
    arriving meanwhile waited that long. ``batch``: the entries each batch
    asks for, so that what the loop waits for between two serves is bounded
    (the map's own default when None)."""

    def __init__(self, inner: Any, serve: Callable[[], None], batch: int | None = None) -> None:
        self._inner = inner
        self._serve = serve
        self._batch = batch

    def batches(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        if self._batch is not None and not args:
            kwargs.setdefault("batch", self._batch)
        for batch in self._inner.batches(*args, **kwargs):
            yield batch
            self._serve()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(BlockingIOError):
        sock.recv(64)
