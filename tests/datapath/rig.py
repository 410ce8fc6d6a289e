"""Drives the loaded datapath through BPF_PROG_TEST_RUN, mirrored by a model World.

One :class:`Rig` per test module: the object is loaded once, and
:meth:`Rig.reset` empties the maps between tests.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

from offloader.bpfobj import RingBuffer
from offloader.datapath import Datapath, FlowKey, Verdict
from offloader.errors import BpfError

from . import model
from .model import TC, XDP, Flow, Outcome, World

LO = 1  # test_run runs on the loopback device, ifindex 1


class SkBuff(ctypes.Structure):
    """uapi struct __sk_buff (linux/bpf.h), the ctx of a TC test run."""

    _fields_ = [
        ("len", ctypes.c_uint32),
        ("pkt_type", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("queue_mapping", ctypes.c_uint32),
        ("protocol", ctypes.c_uint32),
        ("vlan_present", ctypes.c_uint32),
        ("vlan_tci", ctypes.c_uint32),
        ("vlan_proto", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("tc_index", ctypes.c_uint32),
        ("cb", ctypes.c_uint32 * 5),
        ("hash", ctypes.c_uint32),
        ("tc_classid", ctypes.c_uint32),
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("napi_id", ctypes.c_uint32),
        ("family", ctypes.c_uint32),
        ("remote_ip4", ctypes.c_uint32),
        ("local_ip4", ctypes.c_uint32),
        ("remote_ip6", ctypes.c_uint32 * 4),
        ("local_ip6", ctypes.c_uint32 * 4),
        ("remote_port", ctypes.c_uint32),
        ("local_port", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("flow_keys", ctypes.c_uint64),  # __bpf_md_ptr: 8 bytes, 8-aligned
        ("tstamp", ctypes.c_uint64),
        ("wire_len", ctypes.c_uint32),
        ("gso_segs", ctypes.c_uint32),
        ("sk", ctypes.c_uint64),  # __bpf_md_ptr
        ("gso_size", ctypes.c_uint32),
        ("tstamp_type", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 3),
        ("hwtstamp", ctypes.c_uint64),
    ]


assert ctypes.sizeof(SkBuff) == 192, "struct __sk_buff of linux 6.x is 192 bytes"


def xdp_ctx(frame_len: int, ifindex: int = LO) -> bytes:
    """struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex."""
    return struct.pack("=6I", 0, frame_len, 0, ifindex, 0, 0)


def skb_ctx(gso_size: int, gso_segs: int) -> bytes:
    skb = SkBuff(gso_size=gso_size, gso_segs=gso_segs)
    return bytes(skb)


@dataclass(frozen=True)
class Result:
    retval: int
    frame: bytes


class Rig:
    """The datapath under test and the model's World kept in step with its maps."""

    def __init__(self, dp: Datapath):
        self.dp = dp
        self.world = World()
        self.events: list[FlowKey] = []
        self.ring = RingBuffer(dp.events, lambda raw: self.events.append(FlowKey.unpack(raw[:52])))

    def close(self) -> None:
        self.ring.close()

    def take_events(self) -> list[FlowKey]:
        """The new tuples announced on the ring buffer since the last call."""
        self.ring.consume()
        taken, self.events = self.events, []
        return taken

    def reset(self, *, dsa_proto: int = model.DSA_NONE) -> None:
        dp = self.dp
        self.take_events()  # a full ring would turn "new" into "new + event_drop"
        dp.flows.clear()
        dp.settle_pending()
        dp.pending.clear()
        dp.configure(enabled=True, heartbeat_timeout=3600.0)
        dp.set_iface(LO, dsa_proto)
        self.world = World(dsa_proto=dsa_proto)

    def set_dsa(self, dsa_proto: int) -> None:
        self.dp.set_iface(LO, dsa_proto)
        self.world.dsa_proto = dsa_proto

    def offload(self, key: FlowKey, verdict: Verdict) -> None:
        self.dp.offload(key, verdict)
        self.dp.settle_pending()  # as the agent at the end of each handler
        self.world.flows[key] = Flow(verdict)
        self.world.pending.discard(key)

    def mark_pass(self, key: FlowKey) -> None:
        self.dp.mark_pass(key)
        self.dp.settle_pending()
        self.world.flows.pop(key, None)
        self.world.flows[key] = Flow(verdict=None, state=model.STATE_PASS)  # type: ignore[arg-type]
        self.world.pending.discard(key)

    def run(self, hook: str, frame: bytes, *, gso_size: int = 0, gso_segs: int = 0) -> Result:
        if hook == XDP:
            r = self.dp.xdp.test_run(frame, xdp_ctx(len(frame)))
        else:
            ctx = skb_ctx(gso_size, gso_segs) if (gso_size or gso_segs) else None
            r = self.dp.tc.test_run(frame, ctx)
        return Result(r.retval, r.data)

    def check(self, hook: str, frame: bytes, *, gso_size: int = 0, gso_segs: int = 0,
              stats: bool = True, parse_counters_as_one: bool = False) -> tuple[Outcome, Result]:
        """Run ``frame`` and the model; assert return code, frame and (with
        ``stats``) the counters agree. ``parse_counters_as_one`` counts
        pass_l2 and pass_l3 as one (the edge tests pin which is which).
        Returns both for further checks."""
        before = self.dp.stats() if stats else {}
        want = model.expect(frame, self.world, hook, gso_size=gso_size, gso_segs=gso_segs)
        got = self.run(hook, frame, gso_size=gso_size, gso_segs=gso_segs)
        assert got.retval == want.retval(hook), (
            f"{hook}: return code {got.retval}, model says {want.retval(hook)} ({want.why})"
            f"\n frame {frame.hex()}")
        assert got.frame == want.frame, (
            f"{hook}: output differs from the model ({want.why})\n in    {frame.hex()}"
            f"\n got   {got.frame.hex()}\n model {want.frame.hex()}")
        if stats:
            moved = {k: v - before[k] for k, v in self.dp.stats().items() if v != before[k]}
            expected = {"rx": 1}
            if want.stat:
                expected[want.stat] = 1
            if parse_counters_as_one:
                for counts in (moved, expected):
                    if "pass_l3" in counts:
                        counts["pass_l2"] = counts.pop("pass_l3")
            assert moved == expected, f"{hook}: counters moved {moved}, model says {expected}"
        return want, got


def refused(hook: str, frame: bytes) -> bool:
    """Frames BPF_PROG_TEST_RUN itself rejects (EINVAL) before any program
    runs: under 14 bytes; for TC also an IPv4/IPv6 ethertype at byte 12 with
    less than a whole IP header behind it (the kernel builds an skb socket
    from it)."""
    if len(frame) < 14:
        return True
    etype = int.from_bytes(frame[12:14], "big")
    if hook == TC and etype == model.ETH_P_IP:
        return len(frame) < 14 + 20
    if hook == TC and etype == model.ETH_P_IPV6:
        return len(frame) < 14 + 40
    return False


def run_or_einval(rig: Rig, hook: str, frame: bytes) -> Result | None:
    """Run ``frame``; None when test_run refuses it, as :func:`refused` predicts."""
    try:
        result = rig.run(hook, frame)
    except BpfError as exc:
        if refused(hook, frame) and exc.errno == 22:
            return None
        raise
    assert not refused(hook, frame), f"{hook}: test_run took a {len(frame)}-byte frame"
    return result
