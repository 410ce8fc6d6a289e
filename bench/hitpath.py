"""`python -m bench.hitpath [--packets N] [--json]`: the datapath's hit path
in ns per packet, measured with BPF_PROG_TEST_RUN.

What is timed: the program alone, from parse to the redirect decision
(bpf_redirect_map / bpf_redirect set the target; test_run does not transmit),
including its map lookups, bpf_ktime_get_ns, the rewrite and, for TC, the skb
helpers (VLAN pop, adjust_room, l4_csum_replace).

Two methods, because test_run with ``repeat`` runs the program again on the
frame it has just rewritten:

chain   The frame's own rewrite maps back onto an offloaded flow (same
        encapsulation in and out; a NAT row installs the reverse flow too, so
        iterations alternate between the two). TTL 255 gives 254 hits per
        call; enough calls make up ``--packets`` (default 1,000,000). The
        kernel's mean per call, averaged over calls. Checked: the redirect
        counter moved by exactly the packets timed.
single  One run per call (repeat=1), the mean over many calls (the slowest
        10% dropped: interrupts; the kernel's clock reads in 10 ns steps here,
        a mean resolves below that), minus the per-call timer overhead (a constant pass-through path timed with
        repeat=1 and with repeat=254). Used where no chain exists: TC cannot
        take PPPoE on ingress, so its VLAN+PPPoE row starts untagged, and its
        802.1Q rewrite does not chain (see ``chains``).

The bench runs in a network namespace of its own, with the XDP program
attached (generic mode) to that namespace's lo: test_run with repeat > 1
puts the program into the kernel's XDP dispatcher and takes it out again on
every call (milliseconds each on a busy machine) unless it is attached
somewhere, as it is on a router.

Frames and verdicts come from the datapath tests' model (tests/datapath).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Any

from offloader.bpfobj import xdp_attach
from offloader.datapath import Datapath, Verdict, find_object
from tests.datapath import model
from tests.datapath.model import ENCAPS, Encap
from tests.datapath.rig import xdp_ctx

CHAIN = 254  # a TTL of 255 forwards 254 times before TTL <= 1 passes
SINGLE_RUNS = 20_000
XDP_REDIRECT, TC_ACT_REDIRECT = 4, 7
CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class Row:
    name: str
    ingress: str  # ENCAPS name
    egress: str
    family: int = 4
    nat: bool = False  # SNAT with port, and the reverse flow for the chain
    tc_ingress: str = ""  # TC's ingress when it cannot take ``ingress``


ROWS = (
    Row("IPv4", "none", "none"),
    Row("IPv4 SNAT+port", "none", "none", nat=True),
    Row("IPv6", "none", "none", family=6),
    Row("802.1Q", "dot1q", "dot1q"),
    Row("VLAN+PPPoE", "vlan_pppoe", "vlan_pppoe", tc_ingress="none"),
)


@dataclass
class Result:
    case: str
    hook: str
    ingress: str
    egress: str
    chain_ns: float | None
    chain_packets: int
    single_ns: float | None
    single_runs: int


def _frame(encap: Encap, family: int) -> bytes:
    l3 = model.l3_packet(family, "tcp", ttl=255, payload=b"b" * 64, tcp_flags="A")
    return model.build_frame(encap, l3)


def _install(dp: Datapath, row: Row, ingress: str) -> None:
    """The row's flow, and for NAT the flow its rewritten frame arrives as."""
    dp.flows.clear()
    dp.pending.clear()
    encap, egress = ENCAPS[ingress], ENCAPS[row.egress]
    key = model.flow_key(encap, row.family, "tcp")
    dp.offload(key, model.make_verdict(key, egress, "snat_port" if row.nat else "none"))
    if row.nat:
        back = key.replace(src=model.NAT_ADDRS[row.family][0], sport=model.NAT_SPORT)
        dp.offload(back, Verdict(oif=1, l2=egress.l2header(model.DMAC_OUT, model.SMAC_OUT),
                                 mtu=1500, key=back, nat_src=key.src, nat_sport=key.sport))


def trimmed_mean(values: list[int], keep: float = 0.9) -> float:
    """Mean of the fastest ``keep`` share of ``values``."""
    ordered = sorted(values)
    return statistics.fmean(ordered[: max(1, int(len(ordered) * keep))])


def enter_private_netns() -> None:
    """Move this process into a new network namespace (gone when it exits)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")


def _run(dp: Datapath, hook: str, frame: bytes, repeat: int) -> tuple[int, int]:
    prog = dp.xdp if hook == model.XDP else dp.tc
    r = prog.test_run(frame, xdp_ctx(len(frame)) if hook == model.XDP else None, repeat=repeat)
    return r.retval, r.duration_ns


def timer_overhead(dp: Datapath, hook: str, runs: int) -> float:
    """ns a repeat=1 call adds over the steady state: an ARP frame passes on
    a constant path (no rewrite), timed both ways."""
    arp = bytes.fromhex("ffffffffffff02000000000208060001080006040001") + bytes(20)
    once = trimmed_mean([_run(dp, hook, arp, 1)[1] for _ in range(runs)])
    steady = statistics.fmean(_run(dp, hook, arp, CHAIN)[1] for _ in range(runs // 50 + 1))
    return once - steady


def chains(row: Row, hook: str, ingress: str) -> bool:
    """Whether the row's rewritten frame is a hit again. Not for TC with an
    egress VLAN tag: the program writes the tag into the frame but the skb's
    protocol stays IPv4, so on the next run bpf_skb_vlan_pop() finds no tag
    to pop (a test_run artefact: a real skb is parsed afresh by the receiver)."""
    return ingress == row.egress and (hook == model.XDP or not ENCAPS[row.egress].vlans)


def measure_chain(dp: Datapath, hook: str, frame: bytes, packets: int) -> tuple[float, int]:
    calls = -(-packets // CHAIN)
    before = dp.stats()
    total = 0
    for _ in range(calls):
        total += _run(dp, hook, frame, CHAIN)[1]
    moved = {k: v - before[k] for k, v in dp.stats().items() if v != before[k]}
    if moved.get("redirect") != calls * CHAIN:
        raise RuntimeError(f"{hook}: of {calls * CHAIN} runs, not all took the hit path: {moved}")
    return total / calls, calls * CHAIN


def measure_single(dp: Datapath, hook: str, frame: bytes, runs: int,
                   overhead: float) -> float:
    want = XDP_REDIRECT if hook == model.XDP else TC_ACT_REDIRECT
    durations = []
    for _ in range(runs):
        retval, ns = _run(dp, hook, frame, 1)
        if retval != want:
            raise RuntimeError(f"{hook}: returned {retval}, not a redirect")
        durations.append(ns)
    return trimmed_mean(durations) - overhead


def measure(dp: Datapath, packets: int, single_runs: int) -> tuple[list[Result], dict[str, float]]:
    dp.configure(heartbeat_timeout=3600.0)
    overheads = {hook: timer_overhead(dp, hook, single_runs) for hook in (model.XDP, model.TC)}
    results = []
    for row in ROWS:
        for hook in (model.XDP, model.TC):
            ingress = row.tc_ingress if (hook == model.TC and row.tc_ingress) else row.ingress
            frame = _frame(ENCAPS[ingress], row.family)
            _install(dp, row, ingress)
            chain_ns, chain_packets = None, 0
            if chains(row, hook, ingress):
                try:
                    chain_ns, chain_packets = measure_chain(dp, hook, frame, packets)
                except RuntimeError as exc:
                    raise RuntimeError(f"{row.name}: {exc}") from None
            single_ns = measure_single(dp, hook, frame, single_runs, overheads[hook])
            results.append(Result(row.name, hook, ingress, row.egress, chain_ns, chain_packets,
                                  single_ns, single_runs))
    return results, overheads


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def table(results: list[Result], meta: dict[str, Any]) -> str:
    lines = [f"hit path, ns per packet (BPF_PROG_TEST_RUN, {meta['kernel']}, {meta['cpu']})",
             f"{'case':<16} {'hook':<4} {'in > out':<24} {'chain':>7} {'single':>7}"]
    for r in results:
        lines.append(f"{r.case:<16} {r.hook:<4} {r.ingress + ' > ' + r.egress:<24} "
                     f"{_fmt(r.chain_ns):>7} {_fmt(r.single_ns):>7}")
    lines.append(f"chain: {results[0].chain_packets:,} packets per row; single: mean of "
                 f"{results[0].single_runs:,} runs (fastest 90%) minus timer overhead "
                 + ", ".join(f"{h} {v:.1f} ns" for h, v in meta["timer_overhead_ns"].items()))
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.hitpath", description=__doc__.split("\n")[0])
    ap.add_argument("--packets", type=int, default=1_000_000, help="packets per chain row")
    ap.add_argument("--single-runs", type=int, default=SINGLE_RUNS)
    ap.add_argument("--object", default="", help="BPF object (default: build/offload.bpf.o)")
    ap.add_argument("--cpu", type=int, default=None, help="pin to this CPU")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.hitpath: needs root (BPF_PROG_TEST_RUN)", file=sys.stderr)
        return 1
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    obj = find_object(args.object)
    enter_private_netns()
    dp = Datapath(obj, max_flows=1024)
    try:
        xdp_attach(1, dp.xdp, "xdpgeneric")  # this namespace's lo; see the docstring
        results, overheads = measure(dp, args.packets, args.single_runs)
    finally:
        dp.close()
    meta = {"kernel": platform.release(), "cpu": _cpu_name(), "timer_overhead_ns": overheads,
            "chain_repeat": CHAIN}
    if args.json:
        print(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2))
    else:
        print(table(results, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
