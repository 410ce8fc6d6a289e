"""A flood on one repeating tuple, for early-drop tests and the bench: run
inside a namespace, prints the number of packets sent.

    python3 -m tests.integration.flood udp|syn SRC SPORT DST DPORT COUNT PPS

UDP goes through a connected socket; TCP SYNs are built by hand and sent on
a raw socket (the kernel fills in the IP checksum and id), the same SYN
again and again, as a SYN flood on one tuple does. IPv4 only.
"""

from __future__ import annotations

import socket
import struct
import sys
import time

BATCH = 64  # packets between two looks at the clock


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def syn(src: str, sport: int, dst: str, dport: int) -> bytes:
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 12345, 0, 5 << 4, 0x02, 64240, 0, 0)
    check = _csum(s + d + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp)) + tcp)
    tcp = tcp[:16] + struct.pack("!H", check) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64,
                     socket.IPPROTO_TCP, 0, s, d)
    return ip + tcp


def flood(kind: str, src: str, sport: int, dst: str, dport: int, count: int, pps: int) -> int:
    if kind == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((src, sport))
        sock.connect((dst, dport))
        payload = b"f" * 18

        def send() -> None:
            sock.send(payload)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        packet = syn(src, sport, dst, dport)

        def send() -> None:
            sock.sendto(packet, (dst, 0))
    sent = tries = 0
    start = time.monotonic()
    with sock:
        while tries < count:
            for _ in range(min(BATCH, count - tries)):
                tries += 1
                try:
                    send()
                    sent += 1
                except OSError:  # an ICMP error reported on the connected socket
                    pass
            ahead = tries / pps - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
    return sent


if __name__ == "__main__":
    k, a, ap, b, bp, n, rate = sys.argv[1:8]
    print(flood(k, a, int(ap), b, int(bp), int(n), int(rate)))
