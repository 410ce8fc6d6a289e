"""Handing a connection back to conntrack's own timeout.

While a flow is offloaded the sweep renews its conntrack entry with a long
timeout (``SweepPlan.keep_s``, at least ``OFFLOAD_TIMEOUT_S``), as the
kernel's nf_flow_table does for the flows it offloads. When the agent hands
the flow back (idle, a mark change, a flush, shutdown ...) the entry must
get back what the kernel alone would have left it: the class's timeout
minus the time since the connection's last packet; when nothing is left the
kernel would have forgotten the connection, so the entry is deleted.

A connection has two directions, two flow entries. A direction handed back
alone (its partner idle-free, still offloaded) must not shorten the
connection's entry: the partner's packets keep it alive. So a hand-back is
held (``pending``) while the sweep reads the rest of this pass and all of
the next, which visits every entry once: a direction of the connection
still offloaded and not idle cancels it, one passed to the kernel (whose
packets the kernel sees and which we cannot date) puts the full class
timeout back, and a partner handed back too is merged (the later of their
last packets). When the map is emptied at once (a flush, shutdown) no
partner can remain and everything is sent at once.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .layout import layout
from .records import Records

NS = 1_000_000_000
PENDING_KEPT = 16384  # connections held at most (a pass ends early when more are)


class RefreshClass(enum.Enum):
    """Conntrack timeout classes: which of the namespace's timeouts applies."""

    TCP = "tcp"  # nf_conntrack_tcp_timeout_established
    UDP = "udp"  # nf_conntrack_udp_timeout_stream (assured)
    UDP_NEW = "udp-new"  # nf_conntrack_udp_timeout (not assured)


class PutBack(Protocol):
    def put_back(self, items: Sequence[tuple[bytes, bytes, bytes, bytes, int, bool, int, int]]
                 ) -> int: ...


@dataclass(slots=True)
class Held:
    """One connection handed back, its conntrack timeout not yet put back."""

    key: bytes  # the raw flow key of one direction: addresses the conntrack entry
    wires: tuple[bytes, bytes]  # the wire ids of both directions
    reply: bool
    zone: int
    cls: RefreshClass
    last_ns: int  # the connection's last packet the datapath saw (0: none)
    kernel_side: bool = False  # a direction of it goes through the kernel


class Handback:
    """Connections handed back, until their conntrack timeout is put back."""

    def __init__(self, ct: PutBack, rec: Records) -> None:
        self.ct = ct
        self.rec = rec
        c, off = layout().consts, layout().ffi.offsetof
        self._nat = (off("struct ofl_verdict", "nat_sport"), off("struct ofl_verdict", "nat_dport"),
                     off("struct ofl_verdict", "nat_saddr"), off("struct ofl_verdict", "nat_daddr"))
        self._nat_flags = (c["OFL_V_SPORT"], c["OFL_V_DPORT"], c["OFL_V_SNAT"], c["OFL_V_DNAT"])
        # Held connections of this pass and of the previous one, by the
        # wire id of either direction (one Held, two ids).
        self._held: tuple[dict[bytes, Held], dict[bytes, Held]] = ({}, {})
        self.put_back = 0  # entries given their timeout back
        self.expired = 0  # entries deleted: the kernel would have forgotten them
        self.dropped = 0  # not held, beyond PENDING_KEPT: their next packet resets the timeout

    def __len__(self) -> int:
        return (len(self._held[0]) + len(self._held[1])) // 2

    def wires(self) -> set[bytes]:
        """Wire ids of every direction of the connections held: the sweep
        reports which of them it finds in the map (``found``)."""
        return set(self._held[0]) | set(self._held[1])

    def partner_wire(self, raw_key: bytes, raw_flow: bytes) -> bytes:
        """The wire id of the other direction: this direction's tuple after
        the verdict's NAT rewrites, reversed (ports and addresses in the
        key's network order)."""
        rec = self.rec
        flags = raw_flow[rec.v_flags]
        sp, dp, sa, da = self._nat
        f_sport, f_dport, f_snat, f_dnat = self._nat_flags
        ks = rec.k_sport
        sport = raw_flow[sp : sp + 2] if flags & f_sport else raw_key[ks : ks + 2]
        dport = raw_flow[dp : dp + 2] if flags & f_dport else raw_key[ks + 2 : ks + 4]
        src = raw_flow[sa : sa + 16] if flags & f_snat else raw_key[rec.k_saddr : rec.k_saddr + 16]
        dst = raw_flow[da : da + 16] if flags & f_dnat else raw_key[rec.k_daddr : rec.k_daddr + 16]
        return raw_key[rec.k_proto : rec.k_proto + 1] + dport + sport + dst + src

    def hold(self, entries: Iterable[tuple[bytes, bytes, RefreshClass]]) -> None:
        """Offloaded flows handed back: (raw key, raw flow, class) each."""
        rec = self.rec
        new, old = self._held
        for raw_key, raw_flow, cls in entries:
            own, other = rec.wire(raw_key), self.partner_wire(raw_key, raw_flow)
            last = int.from_bytes(raw_flow[rec.f_last : rec.f_last + 8], "little")
            held = new.get(own) or new.get(other) or old.get(own) or old.get(other)
            if held is not None:  # the other direction came back too: the later packet counts
                held.last_ns = max(held.last_ns, last)
                continue
            if len(new) + len(old) >= 2 * PENDING_KEPT:
                self.dropped += 1
                continue
            held = Held(raw_key, (own, other), bool(raw_flow[rec.v_flags] & rec.flag_reply),
                        rec.zone(raw_flow), cls, last)
            new[own] = new[other] = held

    def found(self, wire: bytes, offloaded: bool) -> None:
        """The sweep read a direction of a held connection in the map: still
        offloaded and active (the connection lives on: nothing to put back),
        or passed to the kernel (the kernel dates its packets: the full
        class timeout goes back)."""
        for gen in self._held:
            held = gen.get(wire)
            if held is None:
                continue
            if offloaded:
                for w in held.wires:
                    gen.pop(w, None)
            else:
                held.kernel_side = True

    def offloaded_again(self, wires: Iterable[bytes]) -> None:
        """Directions offloaded anew: their connection lives on."""
        for wire in wires:
            self.found(wire, True)

    def end_pass(self, timeouts: dict[RefreshClass, int], now_ns: int) -> int:
        """A pass ended: what the last two passes have checked is put back;
        what this one held waits for the next. Returns how many were sent."""
        old = self._held[1]
        self._held = ({}, self._held[0])
        return self._send(old, timeouts, now_ns)

    def send_all(self, timeouts: dict[RefreshClass, int], now_ns: int) -> int:
        """Put back everything held (the map was emptied: no partner remains)."""
        new, old = self._held
        self._held = ({}, {})
        return self._send({**old, **new}, timeouts, now_ns)

    def overflowing(self) -> bool:
        return len(self) > PENDING_KEPT

    def _send(self, held: dict[bytes, Held], timeouts: dict[RefreshClass, int],
              now_ns: int) -> int:
        unique = {id(h): h for h in held.values()}
        if not unique:
            return 0
        items = [self.item(h, timeouts, now_ns) for h in unique.values()]
        sent = self.ct.put_back(items)
        expired = sum(1 for it in items if it[7] == 0)
        self.expired += expired
        self.put_back += len(items) - expired
        return sent

    def item(self, h: Held, timeouts: dict[RefreshClass, int], now_ns: int
             ) -> tuple[bytes, bytes, bytes, bytes, int, bool, int, int]:
        """The conntrack update for one held connection: (source,
        destination, ports in network order, protocol, is reply, zone,
        timeout), timeout 0 meaning delete: the class timeout less the time
        since its last packet, the whole class timeout when the kernel sees
        a direction of it, nothing left: expired."""
        full = timeouts[h.cls]
        if h.kernel_side or not h.last_ns:
            left = full
        else:
            left = min(full, int(full - (now_ns - h.last_ns) / NS))
        return self.rec.ct_item(h.key, h.reply, h.zone, max(0, left))
