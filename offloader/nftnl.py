"""nftables over netlink: the message and attribute walk, rule and chain
dumps, and the ruleset's generation id. What the agent reads of the ruleset
(offloader/nftwatch.py for early drop, offloader/policy.py for the packet
mark) comes from here, straight from the kernel: no `nft` process to start
and wait for. A dump is answered by the kernel inside the reads that collect
it, so it never waits on anything else, and the sockets are non-blocking.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable, Iterator

from pyroute2.netlink import NETLINK_NETFILTER, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES
from pyroute2.netlink.nfnetlink.nftsocket import NFT_MSG_GETGEN, NFT_MSG_NEWGEN

NLMSG = struct.Struct("=IHHII")
NFGEN = struct.Struct("=BBH")
NLA = struct.Struct("=HH")
NLA_TYPE_MASK = 0x3FFF
NLM_F_DUMP_INTR = 0x10  # the ruleset changed while the dump ran: it may be inconsistent
NFTA_GEN_ID = 1
DUMP_TRIES = 3  # a dump interrupted by a change is taken again, at most this often

Opener = Callable[[], socket.socket]


def nf_socket() -> socket.socket:
    """A non-blocking NETLINK_NETFILTER socket in the caller's network
    namespace. Non-blocking costs nothing here: the kernel queues its answer
    to a request inside send(), and each next part of a dump inside the
    recv() that takes the one before; an answer not there counts as an
    error (BlockingIOError), never as a wait."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    s.setblocking(False)
    return s


def attrs(data: bytes, off: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of the netlink attributes in ``data[off:end]``."""
    end = len(data) if end is None else end
    while off + 4 <= end:
        length, kind = NLA.unpack_from(data, off)
        if length < 4:
            return
        yield kind & NLA_TYPE_MASK, data[off + 4 : off + length]
        off += (length + 3) & ~3


def messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, nfgen family, body after the nfgenmsg) of each netlink message."""
    off = 0
    while off + NLMSG.size <= len(data):
        length, kind, _flags, _seq, _pid = NLMSG.unpack_from(data, off)
        if length < NLMSG.size:
            return
        family = data[off + 16] if length >= 20 else 0
        yield kind, family, data[off + 20 : off + length]
        off += (length + 3) & ~3


NFTA_RULE_EXPRESSIONS, NFTA_EXPR_NAME, NFTA_EXPR_DATA = 4, 1, 2
NFTA_XT_NAME = 1  # NFTA_TARGET_NAME, NFTA_MATCH_NAME


def expressions(rule: bytes) -> Iterator[tuple[str, dict[int, bytes]]]:
    """(name, attributes) of a rule's expressions (an NFT_MSG_NEWRULE body),
    in order; iptables-nft's `target` and `match` by their xt name (MARK,
    CONNMARK, CT, ...)."""
    for kind, payload in attrs(rule):
        if kind != NFTA_RULE_EXPRESSIONS:
            continue
        for _, elem in attrs(payload):
            name, data = "", b""
            for k, v in attrs(elem):
                if k == NFTA_EXPR_NAME:
                    name = v.rstrip(b"\0").decode(errors="replace")
                elif k == NFTA_EXPR_DATA:
                    data = v
            inner = dict(attrs(data))
            if name in ("target", "match"):
                name = inner.get(NFTA_XT_NAME, b"").rstrip(b"\0").decode(errors="replace")
            yield name, inner


def _request(kind: int, flags: int) -> bytes:
    msg_type = (NFNL_SUBSYS_NFTABLES << 8) | kind
    return NLMSG.pack(NLMSG.size + NFGEN.size, msg_type, NLM_F_REQUEST | flags, 1, 0) \
        + NFGEN.pack(socket.AF_UNSPEC, 0, 0)


def _dump_once(s: socket.socket, kind: int) -> tuple[list[bytes], bool]:
    s.send(_request(kind, NLM_F_DUMP))
    chunks: list[bytes] = []
    interrupted = False
    while True:
        data = s.recv(1 << 17)
        if not data:
            raise OSError(errno.EIO, "nftables dump ended without NLMSG_DONE")
        off = 0
        while off + NLMSG.size <= len(data):
            length, msg_type, flags, _seq, _pid = NLMSG.unpack_from(data, off)
            if length < NLMSG.size:
                break
            interrupted |= bool(flags & NLM_F_DUMP_INTR)
            if msg_type == NLMSG_ERROR:
                code = -struct.unpack_from("=i", data, off + NLMSG.size)[0]
                if code:
                    raise OSError(code, f"nftables dump: {errno.errorcode.get(code, code)}")
            if msg_type in (NLMSG_DONE, NLMSG_ERROR):
                chunks.append(data[:off])
                return chunks, interrupted
            off += (length + 3) & ~3
        chunks.append(data)


def dump(kind: int, opener: Opener = nf_socket) -> list[bytes]:
    """The datagrams of one consistent NFT_MSG_GET* dump (all families); a
    dump the kernel flags as interrupted by a change is taken again. Raises
    OSError when the kernel refuses or keeps changing the ruleset."""
    with opener() as s:
        s.bind((0, 0))
        for _ in range(DUMP_TRIES):
            chunks, interrupted = _dump_once(s, kind)
            if not interrupted:
                return chunks
    raise OSError(errno.EINTR, "the nftables ruleset kept changing during its dump")


def generation(s: socket.socket) -> int:
    """nftables' ruleset generation id (NFT_MSG_GETGEN): it changes with
    every committed change of the ruleset."""
    s.send(_request(NFT_MSG_GETGEN, 0))
    data = s.recv(4096)
    for msg_type, _family, body in messages(data):
        if msg_type != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN:
            break
        for kind, payload in attrs(body):
            if kind == NFTA_GEN_ID and len(payload) >= 4:
                return int(struct.unpack_from("!I", payload)[0])
    raise OSError(errno.EPROTO, "no nftables generation in the answer")
