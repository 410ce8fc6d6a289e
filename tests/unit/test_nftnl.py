"""nftables dumps over netlink (offloader/nftnl.py): how a dump ends, fails
and is taken again. FAKE socket: the kernel's answers are scripted, byte for
byte as it sends them; a real dump is read in tests/datapath/test_policy_nft.py."""

from __future__ import annotations

import errno
import struct
from typing import Any

import pytest

from offloader import nftnl
from tests.unit.nftmsg import expr, rule

INET = 1
DONE = struct.pack("=IHHIIi", 20, 3, 2, 1, 0, 0)  # NLMSG_DONE, NLM_F_MULTI


def error(code: int) -> bytes:
    return struct.pack("=IHHIIi", 36, 2, 0, 1, 0, -code) + b"\0" * 16  # NLMSG_ERROR


def interrupted(msg: bytes) -> bytes:
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    return struct.pack("=IHHII", length, kind, flags | nftnl.NLM_F_DUMP_INTR, seq, pid) + msg[16:]


class Kernel:
    """A netlink socket whose answers to each request are scripted datagrams."""

    def __init__(self, *answers: list[bytes]) -> None:
        self.answers = list(answers)
        self.pending: list[bytes] = []
        self.requests = 0

    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def bind(self, addr: Any) -> None:
        pass

    def send(self, data: bytes) -> int:
        self.requests += 1
        self.pending = list(self.answers.pop(0))
        return len(data)

    def recv(self, size: int) -> bytes:
        return self.pending.pop(0) if self.pending else b""


R1, R2 = rule(INET, expr("masq")), rule(INET, expr("notrack"))


def test_a_dump_is_every_message_before_done() -> None:
    k = Kernel([R1, R2 + DONE])
    chunks = nftnl.dump(6, opener=lambda: k)
    assert b"".join(chunks) == R1 + R2 and k.requests == 1


def test_an_interrupted_dump_is_taken_again() -> None:
    k = Kernel([interrupted(R1), DONE], [R2 + DONE])
    assert nftnl.dump(6, opener=lambda: k) == [R2]
    always = Kernel(*([interrupted(R1) + DONE],) * nftnl.DUMP_TRIES)
    with pytest.raises(OSError, match="kept changing"):
        nftnl.dump(6, opener=lambda: always)


def test_a_refused_or_cut_dump_is_an_error() -> None:
    with pytest.raises(OSError) as exc:
        nftnl.dump(6, opener=lambda: Kernel([R1 + error(errno.EPERM)]))
    assert exc.value.errno == errno.EPERM
    with pytest.raises(OSError, match="without NLMSG_DONE"):
        nftnl.dump(6, opener=lambda: Kernel([R1]))


def test_generation_id() -> None:
    body = struct.pack("=BBH", 0, 0, 0) + struct.pack("=HH", 8, 1) + struct.pack("!I", 4242)
    newgen = struct.pack("=IHHII", 16 + len(body), (10 << 8) | 15, 0, 1, 0) + body
    assert nftnl.generation(Kernel([newgen])) == 4242
    with pytest.raises(OSError, match="no nftables generation"):
        nftnl.generation(Kernel([error(errno.EINVAL)]))
