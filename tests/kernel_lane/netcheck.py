"""Bounded TCP payload check, run inside test namespaces (`ip netns exec NS python ...`).

    netcheck.py serve ADDR PORT --down N --seed S --timeout T
        binds, prints LISTENING, accepts ONE connection, reads until EOF (hashing),
        then sends N deterministic bytes (seeded) and closes; prints a JSON report.
    netcheck.py send ADDR PORT --up N --seed S --timeout T
        connects, sends N deterministic bytes, shuts down writing, reads until EOF
        (hashing); prints a JSON report.

Every socket operation has a timeout and the whole exchange a deadline.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import socket
import sys
import time

CHUNK = 65536


def payload(nbytes: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(nbytes)


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _recv_all(conn: socket.socket, deadline: float) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(f"deadline passed after {n} bytes")
        b = conn.recv(CHUNK)
        if not b:
            return n, h.hexdigest()
        h.update(b)
        n += len(b)


def serve(a: argparse.Namespace) -> dict:
    deadline = time.monotonic() + a.timeout
    s = socket.socket(_family(a.addr), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(a.timeout)
    s.bind((a.addr, a.port))
    s.listen(1)
    print("LISTENING", flush=True)
    conn, peer = s.accept()
    conn.settimeout(min(20.0, a.timeout))
    up_n, up_sha = _recv_all(conn, deadline)
    data = payload(a.down, a.seed)
    conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)
    # wait for the client's close, bounded
    _recv_all(conn, deadline)
    conn.close()
    s.close()
    return {"peer": peer[0], "up_bytes": up_n, "up_sha256": up_sha,
            "down_sent": len(data), "down_sha256_sent": hashlib.sha256(data).hexdigest()}


def send(a: argparse.Namespace) -> dict:
    deadline = time.monotonic() + a.timeout
    data = payload(a.up, a.seed)
    c = socket.create_connection((a.addr, a.port), timeout=min(20.0, a.timeout))
    c.settimeout(min(20.0, a.timeout))
    t0 = time.monotonic()
    c.sendall(data)
    c.shutdown(socket.SHUT_WR)
    down_n, down_sha = _recv_all(c, deadline)
    dt = time.monotonic() - t0
    c.close()
    return {"up_sent": len(data), "up_sha256_sent": hashlib.sha256(data).hexdigest(),
            "down_bytes": down_n, "down_sha256": down_sha, "seconds": round(dt, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["serve", "send"])
    ap.add_argument("addr")
    ap.add_argument("port", type=int)
    ap.add_argument("--up", type=int, default=0)
    ap.add_argument("--down", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=60.0)
    a = ap.parse_args(argv)
    try:
        rep = serve(a) if a.mode == "serve" else send(a)
    except OSError as e:  # includes timeouts
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return 1
    print(json.dumps(rep), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
