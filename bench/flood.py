"""A paced flood of new 5-tuples as live frames (BPF_F_TEST_XDP_LIVE_FRAMES).

    python -m bench.flood OBJECT DEV DST_MAC SRC_IP DST_IP RATE SECONDS [SPORT DPORT]

Run inside the sending namespace: ``flood_tx`` (bench/flood.bpf.c) gives
each frame the next port pair and transmits it out of DEV (XDP_TX into the
veth peer); with SPORT and DPORT, ``flood_same`` sends that one tuple
again and again. Paced in batches of RATE/100 frames (at most 4,096 per
test_run call), bounded by SECONDS. Prints one JSON line: frames injected,
seconds, calls.
"""

from __future__ import annotations

import ctypes
import json
import socket
import struct
import sys
import time

from offloader.bpfobj import BpfObject, _TestRunOpts, libbpf
from offloader.errors import BpfError

BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1


def frame(dst_mac: bytes, src_mac: bytes, src: str, dst: str, sport: int = 1024,
          dport: int = 1) -> bytes:
    """Ethernet/IPv4/UDP, 60 bytes (FLOOD_FRAME_LEN in bench/flood.bpf.c),
    UDP checksum 0 (none): the program rewrites the ports only, so no
    checksum needs a change."""
    payload = bytes(18)
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64,
                               socket.IPPROTO_UDP, 0, socket.inet_aton(src),
                               socket.inet_aton(dst)))
    words = struct.unpack("!10H", ip)
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    ip[10:12] = struct.pack("!H", ~total & 0xFFFF)
    return dst_mac + src_mac + b"\x08\x00" + bytes(ip) + udp


def flood(obj_path: str, dev: str, dst_mac: bytes, src: str, dst: str, rate: float,
          seconds: float, ports: tuple[int, int] | None = None,
          src_mac: bytes | None = None) -> dict[str, float]:
    """``src_mac``: DEV's, for a caller that entered DEV's namespace with
    setns only (its /sys shows another namespace's devices)."""
    ifindex = socket.if_nametoindex(dev)
    if src_mac is None:
        with open(f"/sys/class/net/{dev}/address") as f:
            src_mac = bytes.fromhex(f.read().strip().replace(":", ""))
    data = frame(dst_mac, src_mac, src, dst, *(ports or ()))
    obj = BpfObject(obj_path)
    obj.load()
    # written again at every run (bench/flood.bpf.c, flood_frame: a recycled
    # page keeps what its last receiver wrote into it)
    obj.map("flood_frame").update(struct.pack("<I", 0), data)
    prog = obj.program("flood_same" if ports else "flood_tx")
    din = ctypes.create_string_buffer(data, len(data))
    ctx = ctypes.create_string_buffer(struct.pack("=6I", 0, len(data), 0, ifindex, 0, 0), 24)
    batch = max(1, min(4096, int(rate / 100)))
    opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts))
    opts.data_in = ctypes.cast(din, ctypes.c_void_p)
    opts.data_size_in = len(data)
    opts.ctx_in = ctypes.cast(ctx, ctypes.c_void_p)
    opts.ctx_size_in = 24
    opts.repeat = batch
    opts.flags = BPF_F_TEST_XDP_LIVE_FRAMES
    run = libbpf().lib.bpf_prog_test_run_opts
    sent = calls = 0
    start = time.monotonic()
    end = start + seconds
    while (now := time.monotonic()) < end:
        due = (now - start) * rate
        if sent > due:
            time.sleep(min((sent - due) / rate, end - now))
            continue
        ret = run(prog.fd, ctypes.byref(opts))
        if ret:
            raise BpfError("live-frame test run", errno=-ret)
        sent += batch
        calls += 1
    obj.close()
    return {"injected": sent, "seconds": time.monotonic() - start, "calls": calls,
            "batch": batch}


def main(argv: list[str] | None = None) -> int:
    a = sys.argv[1:] if argv is None else argv
    mac = bytes.fromhex(a[2].replace(":", ""))
    ports = (int(a[7]), int(a[8])) if len(a) > 8 else None
    print(json.dumps(flood(a[0], a[1], mac, a[3], a[4], float(a[5]), float(a[6]), ports)),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
