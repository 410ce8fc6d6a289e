"""What the agent remembers about connections between events.

The flow table itself lives in the BPF maps. Python keeps, per connection
direction (its wire id, see ``conntrack.wire_id``):

  waiting  the keys the datapath reported and no decision settled yet,
           with when each was last looked at (bounded by the pending map)
  zones    the conntrack zone an event named (queries need it)
  recent   the last conntrack NEW/UPDATE entries (bounded): an event read
           before the ring record of the connection's first packet
  dead     directions conntrack destroyed or closed since the last sweep
  decided  when each recently decided key was settled (bounded): a ring
           record stamped before that is a stale report of the same tuple

Every transition is a method, and a connection's two directions always
move together. Keys are the datapath's raw key bytes: a FlowKey is built
only for a tuple that is decided.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from .conntrack import CtEntry, Tuple5, wire_id
from .datapath import FlowKey

RECHECK_AFTER_NS = 150_000_000  # a waiting key seen again after this: ask conntrack
RECENT_CT = 1024  # conntrack entries remembered from events
DEAD_BEFORE_SWEEP = 8192  # destroyed directions noted before an early sweep
MARKS_KEPT = 8192  # connection marks from UPDATE events kept for the next sweep
STUCK_AFTER_NS = 500_000_000  # the sweep asks conntrack about keys waiting longer
STUCK_BUDGET = 512  # at most this many such queries per sweep (tens of us each)
DECIDED_KEPT = 4096  # decision times kept to recognise stale ring records


def key_tuple(key: FlowKey) -> Tuple5:
    return Tuple5(key.proto, key.src, key.dst, key.sport, key.dport)


def tuple_id(t: Tuple5) -> bytes:
    return wire_id(t.proto, t.sport, t.dport, t.src.packed, t.dst.packed)


def key_id(key: FlowKey) -> bytes:
    return tuple_id(key_tuple(key))


def describe(key: FlowKey) -> str:
    """A key for people (logs)."""
    proto = {6: "tcp", 17: "udp"}.get(key.proto, str(key.proto))
    return f"{proto} {key.src}:{key.sport} > {key.dst}:{key.dport} on {key.ifindex}"


K = TypeVar("K")
V = TypeVar("V")


class Generations(Generic[K, V]):
    """A map that keeps at least the last ``size`` keys set and at most
    twice that: two dicts, the older dropped whole when the newer fills.
    Dropping the oldest key one at a time with ``next(iter(d))`` walks the
    deleted slots that such churn leaves at the front of a dict: 2.8 us a
    call in a burst of new flows, against well under 1 us for this."""

    __slots__ = ("size", "new", "old")

    def __init__(self, size: int) -> None:
        self.size = size
        self.new: dict[K, V] = {}
        self.old: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        """The value set last for ``key`` (values are never None)."""
        v = self.new.get(key)
        return self.old.get(key) if v is None else v

    def set(self, key: K, value: V) -> None:
        new = self.new
        new[key] = value
        if len(new) >= self.size:
            self.old, self.new = new, {}

    def pop(self, key: K) -> None:
        self.new.pop(key, None)
        self.old.pop(key, None)

    def __len__(self) -> int:
        return len(self.new) + len(self.old)


class Seen(enum.Enum):
    """What a ring record asks of the agent."""

    NOTHING = 0  # already waiting, asked recently
    NEW = 1  # first report of this key: wait (or decide with a recent event)
    RECHECK = 2  # still undecided after a while: ask conntrack directly


RawKey = bytes  # a packed struct ofl_key


def raw_key_id(raw: RawKey) -> bytes:
    return key_id(FlowKey.unpack(raw))


class FlowState:
    def __init__(self, *, max_waiting: int,
                 ident: Callable[[RawKey], bytes] = raw_key_id) -> None:
        """``ident``: a raw key's connection-direction id (Records.wire is
        the fast one)."""
        self.max_waiting = max_waiting
        self.ident = ident
        self._waiting: dict[bytes, dict[RawKey, int]] = {}
        self._zones: dict[bytes, int] = {}
        self._recent: Generations[bytes, CtEntry] = Generations(RECENT_CT)
        self._dead: set[bytes] = set()
        self._marks: dict[bytes, int] = {}  # wire id -> mark an UPDATE event carried
        # hash(raw key) -> when decided: the keys themselves were 0.8 MB of
        # the agent's heap once the flows stopped coming (a collision, odds
        # 2**-50 here, costs a key its report until the next, 200 ms later)
        self._decided: Generations[int, int] = Generations(DECIDED_KEPT)

    # -- the datapath reports a key ------------------------------------------------
    def seen(self, key: RawKey, now_ns: int,
             stamp_ns: int | None = None) -> tuple[Seen, CtEntry | None]:
        """Note a key from the ring; with NEW, the conntrack entry an event
        already brought for its connection, if any. ``stamp_ns``: when the
        datapath sent the record; one sent before the key was decided is
        stale (the datapath reports a pending tuple again every 200 ms, and
        such reports queue up while the agent decides) and asks nothing."""
        if stamp_ns is not None:
            settled = self._decided.get(hash(key))
            if settled is not None and stamp_ns <= settled:
                return Seen.NOTHING, None
        tid = self.ident(key)
        keys = self._waiting.setdefault(tid, {})
        since = keys.get(key)
        if since is None:
            keys[key] = now_ns
            if len(self._waiting) > self.max_waiting:
                self._waiting.pop(next(iter(self._waiting)))
            return Seen.NEW, self._recent.get(tid)
        if now_ns - since >= RECHECK_AFTER_NS:
            keys[key] = now_ns
            return Seen.RECHECK, None
        return Seen.NOTHING, None

    def decided(self, key: RawKey, now_ns: int) -> None:
        """``key`` was offloaded or passed at ``now_ns``: it waits no more."""
        self._decided.set(hash(key), now_ns)
        tid = self.ident(key)
        keys = self._waiting.get(tid)
        if keys is not None:
            keys.pop(key, None)
            if not keys:
                del self._waiting[tid]

    def defer(self, key: RawKey, until_ns: int) -> None:
        """Keep ``key`` waiting, not to be asked about before ``until_ns``."""
        self._waiting.setdefault(self.ident(key), {})[key] = until_ns - RECHECK_AFTER_NS

    def waits(self, tid: bytes) -> bool:
        """Whether a key of the connection direction ``tid`` waits for a decision."""
        return tid in self._waiting

    def is_waiting(self, key: RawKey) -> bool:
        return key in self._waiting.get(self.ident(key), {})

    def waiting_count(self) -> int:
        return len(self._waiting)

    # -- conntrack says --------------------------------------------------------------
    def updated(self, entry: CtEntry, orig: bytes, reply: bytes,
                new: bool = False) -> list[tuple[RawKey, bool]]:
        """A NEW/UPDATE event: remember it; the waiting keys it may settle,
        each with whether it is the reply direction.

        The mark goes to the sweep only when it may differ from the one a
        flow of the connection was decided with: not from a NEW event
        (nothing was decided before it), nor when the previous event of
        the connection carried the same mark (a change always comes with
        an event). In a burst of new connections the sweep then has no
        marks to compare the whole flow map against."""
        if entry.zone:
            self._zones[orig] = self._zones[reply] = entry.zone
        prev = self._recent.get(orig)
        if (not new and (prev is None or prev.mark != entry.mark)
                and len(self._marks) < MARKS_KEPT):  # beyond: the next sweep sees the rest
            self._marks[orig] = self._marks[reply] = entry.mark
        self._recent.set(orig, entry)
        self._recent.set(reply, entry)
        waiting = self._waiting
        keys, reply_keys = waiting.get(orig), waiting.get(reply)
        if not keys and not reply_keys:  # the event came first: its ring record decides
            return []
        return [(k, False) for k in keys or ()] + [(k, True) for k in reply_keys or ()]

    def closing(self, orig: bytes, reply: bytes) -> None:
        """The connection is closing: its flows go at the next sweep, and
        nothing of it waits for a decision any more."""
        self._dead.update((orig, reply))
        self._waiting.pop(orig, None)
        self._waiting.pop(reply, None)

    def forget(self, orig: bytes, reply: bytes) -> bool:
        """Conntrack destroyed the connection: forget both directions, and
        note them dead for the sweep. True when enough dead directions have
        piled up that a sweep should run now (bounded memory)."""
        for tid in (orig, reply):
            self._zones.pop(tid, None)
            self._recent.pop(tid)
            self._waiting.pop(tid, None)
            self._dead.add(tid)
        return len(self._dead) > DEAD_BEFORE_SWEEP

    def zone(self, tid: bytes) -> int:
        return self._zones.get(tid, 0)

    def take_marks(self) -> dict[bytes, int]:
        """The connection marks UPDATE events carried since the last call:
        an offloaded flow looked up with another mark may need another route."""
        marks, self._marks = self._marks, {}
        return marks

    def take_dead(self) -> set[bytes]:
        """The dead directions since the last call (the sweep removes their flows)."""
        dead, self._dead = self._dead, set()
        return dead

    # -- flush ---------------------------------------------------------------------------
    def clear_waiting(self) -> None:
        self._waiting.clear()

    # -- the sweep's safety net ------------------------------------------------------
    def sync_pending(self, present: Iterable[RawKey], now_ns: int) -> list[RawKey]:
        """Match the waiting keys to what the pending map holds: keys whose
        ring record was lost start waiting, keys evicted or decided stop.
        Returns the keys waiting longer than STUCK_AFTER_NS (re-stamped),
        and those it adopted whose conntrack event was read already, at
        most STUCK_BUDGET, to be asked about directly.

        Done with set arithmetic on the raw keys; a connection id is built
        only for a key whose ring record was lost. After a burst the
        pending map holds tens of thousands of keys, and building an id for
        each of them every sweep cost more than deciding them."""
        here = set(present)
        known = {k for keys in self._waiting.values() for k in keys}
        stuck: list[RawKey] = []
        for key in here - known:
            tid = self.ident(key)
            self._waiting.setdefault(tid, {})[key] = now_ns
            if self._recent.get(tid) is not None and len(stuck) < STUCK_BUDGET:
                # Its conntrack event came already, and its ring record
                # (in flight, or lost) will find it waiting and ask
                # nothing: nothing else would decide it before it is stuck.
                stuck.append(key)
        gone = known - here
        cutoff = now_ns - STUCK_AFTER_NS
        for tid in list(self._waiting):
            keys = self._waiting[tid]
            if gone:
                for key in [k for k in keys if k in gone]:
                    del keys[key]
                if not keys:
                    del self._waiting[tid]
                    continue
            if len(stuck) < STUCK_BUDGET:
                for key in [k for k, since in keys.items() if since < cutoff]:
                    if len(stuck) < STUCK_BUDGET:
                        keys[key] = now_ns
                        stuck.append(key)
        return stuck
