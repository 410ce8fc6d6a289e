"""Early drop and the egress probe in the loaded datapath (BPF_PROG_TEST_RUN).

The model in model.py knows nothing of early drop: these tests drive the
programs directly and read the maps and counters."""

from __future__ import annotations

import time

import pytest

from offloader.datapath import FlowKey, probe_key

from . import model
from .model import ENCAPS, TC, XDP
from .rig import Rig

HOOKS = pytest.mark.parametrize("hook", [XDP, TC])
ROUTER_MAC = b"\x02\0\0\0\0\x01"  # build_frame's default destination MAC
XDP_DROP, XDP_PASS, TC_ACT_OK, TC_ACT_SHOT = 1, 2, 0, 2
DROPPED = {XDP: XDP_DROP, TC: TC_ACT_SHOT}
PASSED = {XDP: XDP_PASS, TC: TC_ACT_OK}
LEARNED = 2  # OFL_DROP_LEARNED
SECOND = 1_000_000_000


@pytest.fixture
def drig(rig: Rig) -> Rig:
    rig.dp.drops.clear()
    rig.dp.probes.clear()
    rig.dp.configure(enabled=True, heartbeat_timeout=3600.0, early_drop=True)
    return rig


def _frame() -> bytes:
    return model.build_frame(ENCAPS["none"], model.l3_packet(4, "udp"))


def _key() -> FlowKey:
    return model.flow_key(ENCAPS["none"], 4, "udp")


def _moved(rig: Rig, before: dict[str, int]) -> dict[str, int]:
    return {k: v - before[k] for k, v in rig.dp.stats().items() if v != before[k]}


@HOOKS
def test_a_drop_entry_drops_and_counts(drig: Rig, hook: str) -> None:
    drig.dp.add_drop(_key(), LEARNED, time.monotonic_ns() + 60 * SECOND, ROUTER_MAC)
    before = drig.dp.stats()
    for _ in range(3):
        assert drig.run(hook, _frame()).retval == DROPPED[hook]
    assert _moved(drig, before) == {"rx": 3, "drop_learned": 3}
    [entry] = list(drig.dp.drop_entries())
    assert (entry.key, entry.reason, entry.packets) == (_key(), LEARNED, 3)
    assert list(drig.dp.pending_entries()) == []


@HOOKS
def test_frames_for_another_mac_are_bridged_not_dropped(drig: Rig, hook: str) -> None:
    drig.dp.add_drop(_key(), LEARNED, time.monotonic_ns() + 60 * SECOND, b"\x02\0\0\0\0\x99")
    assert drig.run(hook, _frame()).retval == PASSED[hook]
    assert [e[0] for e in drig.dp.pending_entries()] == [_key()]


@HOOKS
def test_an_expired_drop_is_forgotten(drig: Rig, hook: str) -> None:
    drig.dp.add_drop(_key(), LEARNED, time.monotonic_ns() - 1, ROUTER_MAC)
    assert drig.run(hook, _frame()).retval == PASSED[hook]
    assert list(drig.dp.drop_entries()) == []
    assert [e[0] for e in drig.dp.pending_entries()] == [_key()]


@HOOKS
def test_a_drop_comes_before_pending_tuples_and_after_flows(drig: Rig, hook: str) -> None:
    key = _key()
    drig.run(hook, _frame())  # pending now
    # A drop written beside the pending entry, as between add_drop's two
    # writes: the drop map is looked up first, so the frame is dropped and
    # the pending entry does not count it.
    drig.dp.drops.update(key.pack(), _drop_value())
    assert drig.run(hook, _frame()).retval == DROPPED[hook]
    pending = drig.dp.pending_entry(key)
    assert pending is not None and pending[1] == 1
    assert next(iter(drig.dp.drop_entries())).packets == 1
    # An offloaded flow is looked up before either: never dropped.
    drig.offload(key, model.make_verdict(key, ENCAPS["none"], "none"))
    assert drig.run(hook, _frame()).retval != DROPPED[hook]
    assert next(iter(drig.dp.drop_entries())).packets == 1


@HOOKS
def test_early_drop_off_passes(drig: Rig, hook: str) -> None:
    drig.dp.add_drop(_key(), LEARNED, time.monotonic_ns() + 60 * SECOND, ROUTER_MAC)
    drig.dp.configure(enabled=True, heartbeat_timeout=3600.0, early_drop=False)
    assert drig.run(hook, _frame()).retval == PASSED[hook]


def test_a_stale_heartbeat_drops_nothing(drig: Rig) -> None:
    drig.dp.add_drop(_key(), LEARNED, time.monotonic_ns() + 60 * SECOND, ROUTER_MAC)
    drig.dp.configure(enabled=True, heartbeat_timeout=0.5, early_drop=True)
    drig.dp.heartbeat(now_ns=time.monotonic_ns() - SECOND)
    assert drig.run(XDP, _frame()).retval == XDP_PASS


def _drop_value() -> bytes:
    from offloader.layout import layout
    lay = layout()
    d = lay.new("struct ofl_drop")
    d.expires_ns = time.monotonic_ns() + 60 * SECOND
    d.reason = LEARNED
    lay.ffi.memmove(d.dmac, ROUTER_MAC, 6)
    return lay.to_bytes(d)


def test_egress_probe_counts_only_after_the_arm(drig: Rig) -> None:
    key = _key()
    verdict = model.make_verdict(key, ENCAPS["none"], "none")
    pk = probe_key(key, verdict.pack())
    drig.dp.set_probing(True)
    drig.dp.arm_probe(pk, time.monotonic_ns() + 60 * SECOND)
    assert drig.dp.tc_egress.test_run(_frame()).retval == TC_ACT_OK
    assert [p[2] for p in drig.dp.probes_seen()] == [0]
    drig.dp.arm_probe(pk, time.monotonic_ns())
    out = drig.dp.tc_egress.test_run(_frame())
    assert out.retval == TC_ACT_OK and out.data == _frame()
    assert [p[2] for p in drig.dp.probes_seen()] == [1]
    drig.dp.set_probing(False)
    drig.dp.tc_egress.test_run(_frame())
    assert [p[2] for p in drig.dp.probes_seen()] == [1]


def test_the_probe_key_is_the_tuple_after_nat(drig: Rig) -> None:
    """A masqueraded flow leaves with the router's address and port: a frame
    carrying those is the one the probe counts."""
    key = _key()
    verdict = model.make_verdict(key, ENCAPS["none"], "snat_port")
    pk = probe_key(key, verdict.pack())
    drig.dp.set_probing(True)
    drig.dp.arm_probe(pk, time.monotonic_ns())
    drig.dp.tc_egress.test_run(_frame())  # the tuple before NAT: not it
    assert [p[2] for p in drig.dp.probes_seen()] == [0], (pk.hex(), list(drig.dp.probes_seen()))
    nat = model.l3_packet(4, "udp", src=str(verdict.nat_src), sport=model.NAT_SPORT)
    drig.dp.tc_egress.test_run(model.build_frame(ENCAPS["none"], nat))
    assert [p[2] for p in drig.dp.probes_seen()] == [1]
