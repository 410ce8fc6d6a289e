"""Frame fuzzing at volume: prebuilt frames mutated byte-wise, each run
through the XDP and the TC program (BPF_PROG_TEST_RUN) and compared with
the reference model.

Hypothesis (test_property.py) explores structure; this is the volume run:
no scapy and no hypothesis in the hot loop, only ``bytes`` surgery on a
corpus built once per round (every encapsulation the model knows, both
families, TCP and UDP, with verdicts installed for them: offloaded with
random NAT and egress headers, or decided as pass). Per frame the return
code and the output frame must equal the model's; the counters are
compared once per round, in total (pending and new as one: the LRU pending
map may evict a tuple the model still remembers). A frame the model cannot
handle at all (it raises) must be passed unchanged.

Used by tests/datapath/test_fuzz.py (a bounded slice) and by
``python -m bench.reliability`` (the million).
"""

from __future__ import annotations

import ipaddress
import random
import time
from collections import Counter
from dataclasses import dataclass, field

from offloader.datapath import L2Header, Verdict
from offloader.errors import BpfError

from . import model
from .model import TC, XDP
from .rig import Rig, refused, skb_ctx, xdp_ctx

ROUND = 4096  # frames per round: the corpus is rebuilt and the maps reset
EGRESS_TPIDS = (0x8100, 0x88A8, 0x9100)
# Byte values that steer parsers: ethertypes, TPIDs, PPP protocols, lengths.
MAGIC = (0x00, 0x01, 0x02, 0x05, 0x06, 0x11, 0x21, 0x45, 0x46, 0x4F, 0x57, 0x60, 0x7F, 0x80,
         0x81, 0x86, 0x88, 0xA8, 0xDD, 0x64, 0xFF)


@dataclass
class Report:
    frames: int = 0  # distinct frames generated
    runs: int = 0  # program runs (a frame goes through both hooks)
    refused: int = 0  # test_run rejects the frame itself (short frames), as predicted
    redirected: int = 0
    passed: int = 0
    unmodelled: int = 0  # the model raised; the datapath passed the frame unchanged
    mismatches: list[str] = field(default_factory=list)
    stats_rounds_checked: int = 0
    seconds: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)

    @property
    def rate(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0


def _rand_ip(rng: random.Random, family: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if family == 4:
        return ipaddress.IPv4Address(rng.getrandbits(32))
    return ipaddress.IPv6Address(rng.getrandbits(128))


def _egress(rng: random.Random) -> L2Header:
    return L2Header(
        dmac=rng.randbytes(6), smac=rng.randbytes(6),
        vlans=tuple((rng.choice(EGRESS_TPIDS), rng.getrandbits(16))
                    for _ in range(rng.choice((0, 0, 1, 2)))),
        pppoe_sid=rng.choice((0, 0, rng.randint(1, 0xFFFF))),
        dsa_proto=rng.choice((0, 0, 0, model.DSA_MTK, model.DSA_QCA, model.DSA_GSWIP)),
        dsa_port=rng.randint(0, 7),
    )


def _l3(rng: random.Random, family: int, proto: str) -> bytes:
    flags = rng.choice(("A", "PA", "PA", "FA", "R", "S", "SA"))
    return model.l3_packet(
        family, proto, ttl=rng.choice((64, 64, 64, 2, 1)), payload=rng.randbytes(rng.randint(0, 80)),
        tcp_flags=flags, sport=rng.getrandbits(16), dport=rng.getrandbits(16),
        src=str(_rand_ip(rng, family)), dst=str(_rand_ip(rng, family)))


def build_corpus(rig: Rig, rng: random.Random, dsa_proto: int, size: int = 48) -> list[bytes]:
    """Frames of every encapsulation that parses on a device with ``dsa_proto``;
    most of their flows installed (offloaded or pass) in both the map and the
    model's world."""
    encaps = [e for e in model.ENCAPS.values() if e.dsa_proto in (0, dsa_proto)]
    corpus = []
    for i in range(size):
        encap = encaps[i % len(encaps)]
        if dsa_proto and not encap.dsa_proto:
            encap = model.Encap("dsa", vlans=encap.vlans, pppoe_sid=encap.pppoe_sid,
                                dsa_proto=dsa_proto, dsa_port=rng.randint(0, 7))
        family = rng.choice((4, 6))
        frame = model.build_frame(encap, _l3(rng, family, rng.choice(("tcp", "udp", "udp0"))),
                                  trailer=rng.choice((b"", b"", rng.randbytes(rng.randint(1, 20)))))
        corpus.append(frame)
        try:
            key = model.parse(frame, dsa_proto).key(rig.world.ifindex)
        except model.Unparsed:
            continue
        install = rng.choice(("offload",) * 6 + ("pass", "none"))
        if install == "offload":
            nat: dict[str, object] = {}
            if rng.random() < 0.5:
                nat["nat_src"] = _rand_ip(rng, family)
            if rng.random() < 0.5:
                nat["nat_dst"] = _rand_ip(rng, family)
            if rng.random() < 0.5:
                nat["nat_sport"] = rng.getrandbits(16)
            if rng.random() < 0.5:
                nat["nat_dport"] = rng.getrandbits(16)
            l3_len = len(frame)  # an upper bound; the MTU sometimes cuts
            mtu = rng.choice((1500, 1500, 9000, rng.randint(20, l3_len + 8)))
            rig.offload(key, Verdict(oif=1, l2=_egress(rng), mtu=mtu, key=key,
                                     **nat))  # type: ignore[arg-type]
        elif install == "pass":
            rig.mark_pass(key)
    return corpus


def mutate(rng: random.Random, frame: bytes) -> bytes:
    """One of: unchanged, a few random bytes, a magic byte, truncation, growth,
    a header-sized splice from elsewhere in the frame, or pure noise."""
    choice = rng.randrange(16)
    if choice < 4:
        return frame
    b = bytearray(frame)
    if choice < 8:
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.getrandbits(8)
    elif choice < 10:
        # Mostly in the first 64 bytes, where the headers are.
        b[rng.randrange(min(len(b), 64))] = rng.choice(MAGIC)
    elif choice < 12:
        del b[rng.randrange(len(b) + 1):]
    elif choice < 13:
        b += rng.randbytes(rng.randint(1, 64))
    elif choice < 14:
        at, src, n = rng.randrange(len(b)), rng.randrange(len(b)), rng.randint(2, 8)
        b[at:at + n] = frame[src:src + n]
    elif choice < 15:
        at = rng.randrange(12, max(13, min(len(b), 60)))
        b[at:at + 2] = rng.getrandbits(16).to_bytes(2, "big")
    else:
        return rng.randbytes(rng.randint(0, 128))
    return bytes(b)


def _stats_delta(before: dict[str, int], after: dict[str, int]) -> Counter[str]:
    moved: Counter[str] = Counter()
    for name, value in after.items():
        if value != before.get(name, 0):
            moved[name] = value - before.get(name, 0)
    return moved


def _fold(counts: Counter[str]) -> Counter[str]:
    """Counters compared per round: pass_l2 and pass_l3 as one (the edge tests
    pin which is which), new and pending as one (LRU evictions), event_drop
    left out (a full ring on new tuples, not a per-frame outcome)."""
    out: Counter[str] = Counter()
    for name, n in counts.items():
        name = {"pass_l3": "pass_l2", "new": "pending"}.get(name, name)
        if name != "event_drop":
            out[name] += n
    return out


def _run_one(rig: Rig, hook: str, frame: bytes, gso: tuple[int, int],
             report: Report, want_stats: Counter[str]) -> None:
    try:
        want: model.Outcome | None = model.expect(frame, rig.world, hook, gso_size=gso[0],
                                                  gso_segs=gso[1])
    except Exception as exc:  # noqa: BLE001 - a frame the model does not handle
        want = None
        why = f"model raised {type(exc).__name__}: {exc}"
    if hook == XDP:
        prog, ctx = rig.dp.xdp, xdp_ctx(len(frame))
    else:
        prog, ctx = rig.dp.tc, (skb_ctx(*gso) if gso[0] else None)
    try:
        got = prog.test_run(frame, ctx)
    except BpfError as exc:
        if exc.errno == 22 and refused(hook, frame):
            report.refused += 1
            if want is not None:
                _undo(rig, want)
            return
        raise
    report.runs += 1
    want_stats["rx"] += 1
    if refused(hook, frame):
        report.mismatches.append(f"{hook}: test_run took a refused frame {frame.hex()}")
        return
    if want is None:
        report.unmodelled += 1
        if got.retval != model.RETVAL[(hook, model.PASS)] or got.data != frame:
            report.mismatches.append(f"{hook}: {why}, and the datapath did not pass the frame "
                                     f"unchanged: {frame.hex()}")
        return
    if want.stat:
        want_stats[want.stat] += 1
    report.outcomes[f"{hook} {want.stat or 'none'}"] += 1
    if got.retval != want.retval(hook) or got.data != want.frame:
        report.mismatches.append(
            f"{hook}: return {got.retval}, model {want.retval(hook)} ({want.why})\n in    "
            f"{frame.hex()}\n got   {got.data.hex()}\n model {want.frame.hex()}")
    elif want.action == model.REDIRECT:
        report.redirected += 1
    else:
        report.passed += 1


def _undo(rig: Rig, want: model.Outcome) -> None:
    # test_run refused the frame before the program ran: the model's "new"
    # never happened.
    if want.stat == "new" and want.key is not None:
        rig.world.pending.discard(want.key)


def fuzz(rig: Rig, frames: int, seed: int, *, round_size: int = ROUND,
         max_mismatches: int = 20) -> Report:
    """Generate ``frames`` frames from ``seed``; run each through both hooks."""
    rng = random.Random(seed)
    report = Report()
    start = time.monotonic()
    dsa_cycle = (model.DSA_NONE, model.DSA_NONE, model.DSA_MTK, model.DSA_QCA, model.DSA_GSWIP)
    rnd = 0
    while report.frames < frames and len(report.mismatches) < max_mismatches:
        dsa = dsa_cycle[rnd % len(dsa_cycle)]
        rnd += 1
        rig.reset(dsa_proto=dsa)
        corpus = build_corpus(rig, rng, dsa)
        want_stats: Counter[str] = Counter()
        before = rig.dp.stats()
        for _ in range(min(round_size, frames - report.frames)):
            frame = mutate(rng, rng.choice(corpus))
            report.frames += 1
            gso = (0, 0)
            if rng.randrange(8) == 0:
                gso = (rng.randint(1, 2000), rng.randint(1, 64))
            for hook in (XDP, TC):
                _run_one(rig, hook, frame, gso if hook == TC else (0, 0), report, want_stats)
        got_stats = _fold(_stats_delta(before, rig.dp.stats()))
        want = _fold(want_stats)
        if got_stats != want:
            report.mismatches.append(f"round {rnd} (dsa {dsa}): counters moved {dict(got_stats)}, "
                                     f"model says {dict(want)}")
        report.stats_rounds_checked += 1
    report.seconds = time.monotonic() - start
    return report

