"""Conntrack's connection mark (CTA_MARK) reaches CtEntry from both paths:
the pyroute2 query (parse_entry) and the raw event decoder (ctnetlink)."""

from __future__ import annotations

import ipaddress
import struct

from offloader import ctnetlink
from offloader.conntrack import _entry_from, parse_entry

ORIG = (6, ipaddress.ip_address("198.18.1.3").packed, ipaddress.ip_address("198.19.99.1").packed,
        40000, 9000)
REPLY = (6, ORIG[2], ipaddress.ip_address("198.19.20.1").packed, 9000, 40000)


def event(*, mark: int | None) -> bytes:
    """An IPCTNL_MSG_CT_NEW event as the kernel sends it (attributes we read)."""
    body = (ctnetlink.encode_tuple(ctnetlink.CTA_TUPLE_ORIG, ORIG)
            + ctnetlink.encode_tuple(ctnetlink.CTA_TUPLE_REPLY, REPLY)
            + ctnetlink._attr(ctnetlink.CTA_STATUS, struct.pack("!I", 0x8 | 0x10)))
    if mark is not None:
        body += ctnetlink._attr(ctnetlink.CTA_MARK, struct.pack("!I", mark))
    payload = struct.pack("=BBH", 2, 0, 0) + body
    return struct.pack("=IHHII", 16 + len(payload), 1 << 8, 0x400, 0, 0) + payload


def test_event_carries_the_mark() -> None:
    (msg,) = list(ctnetlink.decode(event(mark=0x200)))
    assert isinstance(msg, ctnetlink.Decoded) and msg.mark == 0x200
    entry = _entry_from(msg)
    assert entry is not None and entry.mark == 0x200 and entry.status == 0x18
    (msg,) = list(ctnetlink.decode(event(mark=None)))
    assert isinstance(msg, ctnetlink.Decoded) and msg.mark == 0


def _tuple(src: str, dst: str, sport: int, dport: int) -> dict[str, object]:
    return {"CTA_TUPLE_IP": {"CTA_IP_V4_SRC": src, "CTA_IP_V4_DST": dst},
            "CTA_TUPLE_PROTO": {"CTA_PROTO_NUM": 6, "CTA_PROTO_SRC_PORT": sport,
                                "CTA_PROTO_DST_PORT": dport}}


def test_query_answer_carries_the_mark() -> None:
    msg = {"CTA_TUPLE_ORIG": _tuple("198.18.1.3", "198.19.99.1", 40000, 9000),
           "CTA_TUPLE_REPLY": _tuple("198.19.99.1", "198.19.20.1", 9000, 40000),
           "CTA_STATUS": 0x18, "CTA_MARK": 0x200}
    entry = parse_entry(msg)
    assert entry is not None and entry.mark == 0x200
    del msg["CTA_MARK"]
    entry = parse_entry(msg)
    assert entry is not None and entry.mark == 0
