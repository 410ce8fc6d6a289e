"""The ctnetlink codec: what it encodes decodes back to the same attributes,
and damaged input never raises."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offloader import ctnetlink


def test_update_roundtrip_ipv4() -> None:
    t = (6, ipaddress.ip_address("198.18.1.2").packed, ipaddress.ip_address("198.19.2.2").packed,
         40000, 443)
    msg = ctnetlink.encode_update(7, t, reply=True, zone=5, timeout=120, liberal=True, ack=True)
    length, kind, flags, seq, _pid = struct.unpack_from("=IHHII", msg)
    assert length == len(msg) and seq == 7
    assert kind == (1 << 8) | 0 and flags == 0x1 | 0x4
    (decoded,) = list(ctnetlink.decode(msg))
    assert isinstance(decoded, ctnetlink.Decoded)
    assert decoded.reply == t and decoded.orig is None
    assert (decoded.timeout, decoded.zone) == (120, 5)


def test_update_roundtrip_ipv6() -> None:
    t = (17, ipaddress.ip_address("2001:db8:1::2").packed,
         ipaddress.ip_address("2001:db8:2::2").packed, 5353, 53)
    msg = ctnetlink.encode_update(1, t, reply=False, timeout=30)
    assert struct.unpack_from("=B", msg, 16)[0] == socket.AF_INET6
    (decoded,) = list(ctnetlink.decode(msg))
    assert isinstance(decoded, ctnetlink.Decoded)
    assert decoded.orig == t and decoded.timeout == 30 and decoded.zone == 0


def test_a_deletion_names_its_tuple_and_zone_without_ack() -> None:
    t = (17, ipaddress.ip_address("198.18.1.2").packed, ipaddress.ip_address("198.19.2.2").packed,
         40000, 443)
    msg = ctnetlink.encode_delete(3, t, reply=True, zone=5)
    length, kind, flags, seq, _pid = struct.unpack_from("=IHHII", msg)
    assert (length, kind, flags, seq) == (len(msg), (1 << 8) | 2, 0x1, 3)  # CT_DELETE, request
    (decoded,) = list(ctnetlink.decode(msg))
    assert isinstance(decoded, ctnetlink.Decoded)
    assert decoded.reply == t and decoded.orig is None and decoded.zone == 5


def test_acks_carry_sequence_and_error() -> None:
    err = struct.pack("=IHHII", 36, 2, 0, 9, 0) + struct.pack("=i", -2) + b"\0" * 16
    (ack,) = list(ctnetlink.decode(err))
    assert isinstance(ack, ctnetlink.Ack) and (ack.seq, ack.error) == (9, -2)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_never_raises(data: bytes) -> None:
    list(ctnetlink.decode(data))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 120), st.binary(min_size=1, max_size=8))
def test_truncated_and_patched_messages_never_raise(cut: int, patch: bytes) -> None:
    t = (6, b"\xc6\x12\x01\x02", b"\xc6\x13\x02\x02", 1, 2)
    msg = bytearray(ctnetlink.encode_update(1, t, reply=False, timeout=5, liberal=True))
    msg[cut % len(msg) : cut % len(msg) + len(patch)] = patch
    list(ctnetlink.decode(bytes(msg[: max(16, len(msg) - cut)])))


def test_dump_request_and_its_end() -> None:
    msg = ctnetlink.encode_dump(5, socket.AF_INET6)
    length, kind, flags, seq, _pid = struct.unpack_from("=IHHII", msg)
    assert (length, kind, seq) == (len(msg), (1 << 8) | 1, 5)  # CTNETLINK, IPCTNL_MSG_CT_GET
    assert flags == 0x1 | 0x300  # NLM_F_REQUEST | NLM_F_DUMP
    assert struct.unpack_from("=B", msg, 16)[0] == socket.AF_INET6
    done = struct.pack("=IHHII", 20, 3, 0x10, 5, 0) + b"\0" * 4  # NLMSG_DONE, NLM_F_DUMP_INTR
    (end,) = list(ctnetlink.decode(done))
    assert isinstance(end, ctnetlink.Done) and end.seq == 5 and end.interrupted
    (clean,) = list(ctnetlink.decode(struct.pack("=IHHII", 20, 3, 0x2, 6, 0) + b"\0" * 4))
    assert isinstance(clean, ctnetlink.Done) and not clean.interrupted


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([socket.IPPROTO_TCP, socket.IPPROTO_UDP]), st.booleans(),
       st.integers(0, 65535), st.integers(0, 65535), st.booleans())
def test_the_one_step_tuple_read_equals_the_attribute_walk(proto: int, v6: bool, sport: int,
                                                           dport: int, extra: bool) -> None:
    """The kernel's usual tuple layout is read in one step; anything else
    (here: one more attribute inside the tuple) goes the attribute walk."""
    n = 16 if v6 else 4
    t = (proto, bytes(range(1, n + 1)), bytes(range(101, n + 101)), sport, dport)
    tup = ctnetlink.encode_tuple(ctnetlink.CTA_TUPLE_ORIG, t)
    if extra:  # CTA_TUPLE_ZONE inside the tuple, as a directional zone adds it
        inner = tup[4:] + ctnetlink._attr(3, struct.pack("!H", 9))
        tup = struct.pack("=HH", 4 + len(inner), ctnetlink.CTA_TUPLE_ORIG | 0x8000) + inner
    span = (4, len(tup))
    got = ctnetlink.tuple_at(tup, span)
    fixed = dict(ctnetlink._FIXED)
    ctnetlink._FIXED.clear()
    try:
        walked = ctnetlink.tuple_at(tup, span)
    finally:
        ctnetlink._FIXED.update(fixed)
    assert got == walked == t


@pytest.mark.parametrize("src, dst", [
    (bytes([198, 18, 1, 2]), bytes([198, 19, 2, 2])),
    (bytes(range(16)), bytes(range(16, 32)))])
@pytest.mark.parametrize("reply, zone, ack", [
    (False, 0, False), (True, 0, False), (False, 7, False), (True, 65535, True)])
def test_a_refresh_in_one_struct_is_the_attribute_encoding(src: bytes, dst: bytes, reply: bool,
                                                           zone: int, ack: bool) -> None:
    t = (17, src, dst, 40001, 443)
    fast = ctnetlink.encode_update(9, t, reply=reply, zone=zone, timeout=432000, ack=ack)
    assert fast == ctnetlink._encode_update_attrs(9, t, reply=reply, zone=zone, timeout=432000,
                                                  ack=ack)


@pytest.mark.parametrize("src, dst", [
    (bytes([198, 18, 1, 2]), bytes([198, 19, 2, 2])),
    (bytes(range(16)), bytes(range(16, 32)))])
@pytest.mark.parametrize("proto, reply, zone", [(17, False, 0), (6, True, 0), (17, True, 9)])
def test_a_refresh_from_its_template_is_the_same_message(src: bytes, dst: bytes, proto: int,
                                                         reply: bool, zone: int) -> None:
    tmpl = ctnetlink.RefreshTemplate(len(src), proto, reply=reply, zone=zone, timeout=30)
    got = tmpl.message(77, src, dst, (40001).to_bytes(2, "big"), (443).to_bytes(2, "big"))
    assert got == ctnetlink._encode_update_attrs(77, (proto, src, dst, 40001, 443), reply=reply,
                                                 zone=zone, timeout=30)
