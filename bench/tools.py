"""Build and drive the benchmark's helpers: the C blaster, the delivery
counter and the ceiling XDP program, CPU accounting and NAPI pinning."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from offloader.lab import Host

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = ROOT / "build" / "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def sh(cmd: str, *, check: bool = True, timeout: float = 60) -> str:
    p = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode:
        raise RuntimeError(f"{cmd}: {p.stderr.strip() or p.returncode}")
    return p.stdout


def build() -> dict[str, Path]:
    """Compile blast.c (gcc), count/ceiling (clang -target bpf) and the
    datapath object (cmake) if missing; return their paths."""
    OUT.mkdir(parents=True, exist_ok=True)
    arch = sh("gcc -print-multiarch").strip()
    out = {"blast": OUT / "blast"}
    sh(f"gcc -O2 -Wall -o {out['blast']} {HERE / 'blast.c'}")
    for name in ("count", "ceiling", "ceiling_tc", "dropfloor", "flood", "wire"):
        out[name] = OUT / f"{name}.bpf.o"
        sh(f"clang -O2 -g -target bpf -I/usr/include/{arch} -c {HERE / (name + '.bpf.c')} -o {out[name]}")
    obj = ROOT / "build" / "offload.bpf.o"
    if not obj.exists():
        sh(f"cmake -S {ROOT} -B {ROOT / 'build'} >/dev/null && cmake --build {ROOT / 'build'} >/dev/null",
           timeout=300)
    out["offload"] = obj
    return out


# -- CPU time ----------------------------------------------------------------------------
def cpu_busy_s(cpu: int) -> float:
    """Non-idle seconds of one CPU from /proc/stat."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:]]
                # user nice system idle iowait irq softirq steal
                return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / CLK_TCK
    raise RuntimeError(f"no cpu{cpu} in /proc/stat")


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_idle(pid: int, window: float = 0.3, timeout: float = 6.0) -> float:
    """Wait (bounded) until the process used at most one clock tick of CPU in
    each of two windows in a row: an agent past its start-up work (first
    dumps, caches warmed, first sweep). Returns the seconds waited."""
    t0 = time.monotonic()
    quiet, last = 0, proc_cpu_s(pid)
    while quiet < 2 and time.monotonic() - t0 < timeout:
        time.sleep(window)
        now = proc_cpu_s(pid)
        quiet = quiet + 1 if now - last <= 1.0 / CLK_TCK + 1e-9 else 0
        last = now
    return time.monotonic() - t0


def proc_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# -- XDP programs loaded with iproute2 --------------------------------------------------------
def xdp_attach(host: Host, dev: str, obj: Path, section: str = "xdp") -> int:
    host.sh(f"ip link set dev {dev} xdpdrv obj {obj} sec {section}")
    info = json.loads(host.sh(f"ip -j -d link show dev {dev}").stdout)[0]
    return int(info["xdp"]["prog"]["id"])


def xdp_detach(host: Host, dev: str) -> None:
    host.sh(f"ip link set dev {dev} xdpdrv off", check=False)


def tc_attach(host: Host, dev: str, obj: Path, section: str = "tc") -> int:
    """A clsact ingress filter from ``obj``; returns its program id."""
    host.sh(f"tc qdisc add dev {dev} clsact", check=False)  # the agent may have left it
    host.sh(f"tc filter add dev {dev} ingress bpf direct-action obj {obj} sec {section}")
    out = host.sh(f"tc filter show dev {dev} ingress").stdout
    m = re.search(r"\bid (\d+)", out)
    if not m:
        raise RuntimeError(f"no BPF filter on {dev}: {out}")
    return int(m.group(1))


def tc_detach(host: Host, dev: str) -> None:
    host.sh(f"tc qdisc del dev {dev} clsact", check=False)


@contextlib.contextmanager
def egress_queue(host: Host, devs: tuple[str, ...], limit: int = 1000) -> Iterator[None]:
    """A pfifo root qdisc of ``limit`` packets on each of ``devs`` (a veth has
    none: noqueue), removed on exit. A veth whose peer's receive ring (256
    frames) is full stops its queue when it has a qdisc and drops the frame
    when it has none (``veth_xmit``): with a queue, a fast forwarder is held
    back as a NIC's full tx ring holds it back, instead of losing segments."""
    try:
        for dev in devs:
            host.sh(f"tc qdisc replace dev {dev} root pfifo limit {limit}")
        yield
    finally:
        for dev in devs:
            host.sh(f"tc qdisc del dev {dev} root", check=False)


def prog_maps(prog_id: int) -> dict[str, int]:
    info = json.loads(sh(f"bpftool -j prog show id {prog_id}"))
    out = {}
    for mid in info.get("map_ids", []):
        m = json.loads(sh(f"bpftool -j map show id {mid}"))
        out[m["name"]] = mid
    return out


def _hexbytes(data: bytes) -> str:
    return " ".join(f"0x{b:02x}" for b in data)


def map_update(map_id: int, key: bytes, value: bytes, host: Host | None = None) -> None:
    """Update a map entry; a devmap takes ifindexes of the caller's namespace,
    so pass the ``host`` whose namespace they belong to."""
    cmd = f"bpftool map update id {map_id} key {_hexbytes(key)} value {_hexbytes(value)}"
    if host is not None:
        host.sh(cmd)
    else:
        sh(cmd)


def percpu_sum(map_id: int) -> int:
    out = json.loads(sh(f"bpftool -j map lookup id {map_id} key 0 0 0 0"))
    total = 0
    for v in out.get("values", []):
        val = v["value"]
        total += int.from_bytes(bytes(int(x, 16) for x in val), "little") if isinstance(val, list) \
            else int(val)
    return total


@contextlib.contextmanager
def delivery_counter(host: Host, dev: str, obj: Path) -> Iterator[Any]:
    """An XDP program on ``dev`` that counts and drops; yields a callable
    returning the count so far."""
    prog = xdp_attach(host, dev, obj)
    try:
        mid = prog_maps(prog)["bench_delivered"]
        yield lambda: percpu_sum(mid)
    finally:
        xdp_detach(host, dev)


def mac_of(host: Host, dev: str) -> bytes:
    info = json.loads(host.sh(f"ip -j link show dev {dev}").stdout)[0]
    return bytes.fromhex(info["address"].replace(":", ""))


def ifindex_of(host: Host, dev: str) -> int:
    return int(json.loads(host.sh(f"ip -j link show dev {dev}").stdout)[0]["ifindex"])
