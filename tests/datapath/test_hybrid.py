"""The hybrid hook at the packet level: a flow marked for TC (OFL_V_TC) is
passed by XDP untouched and forwarded by TC; on a hybrid device TC leaves
new tuples to XDP, which saw them first."""

from __future__ import annotations

from . import model
from .model import ENCAPS, TC, XDP
from .rig import LO, Rig

REDIRECT_XDP, PASS_XDP = 4, 2  # XDP_REDIRECT, XDP_PASS
REDIRECT_TC, PASS_TC = 7, 0  # TC_ACT_REDIRECT, TC_ACT_OK


def offload_for_tc(rig: Rig, l4: str = "tcp", tc: bool = True) -> bytes:
    key = model.flow_key(ENCAPS["none"], 4, l4)
    rig.offload(key, model.make_verdict(key, ENCAPS["none"], "snat", mtu=1500))
    if tc:
        raw = rig.dp.flows.lookup(key.pack())
        assert raw is not None
        flags_at = rig.dp.layout.ffi.offsetof("struct ofl_verdict", "flags")
        raw = raw[:flags_at] + bytes([raw[flags_at] | rig.dp.layout.const("OFL_V_TC")]) + \
            raw[flags_at + 1 :]
        rig.dp.flows.update(key.pack(), raw)
    return key.pack()


def packets_of(rig: Rig, key: bytes) -> int:
    raw = rig.dp.flows.lookup(key)
    assert raw is not None
    return int(rig.dp.layout.from_bytes("struct ofl_flow", raw).packets)


def test_xdp_passes_a_tc_flow_untouched_and_tc_forwards_it(rig: Rig) -> None:
    key = offload_for_tc(rig)
    frame = model.build_frame(ENCAPS["none"], model.l3_packet(4, "tcp"))
    before = rig.dp.stats()
    got = rig.run(XDP, frame)
    assert (got.retval, got.frame) == (PASS_XDP, frame)
    assert rig.dp.stats()["pass_hybrid"] - before["pass_hybrid"] == 1
    assert packets_of(rig, key) == 0  # XDP neither counts nor stamps it
    tc = rig.run(TC, frame)
    assert tc.retval == REDIRECT_TC and packets_of(rig, key) == 1
    # TC writes what it writes for the same flow without the mark.
    rig.reset()
    offload_for_tc(rig, tc=False)
    plain = rig.run(TC, frame)
    assert (plain.retval, plain.frame) == (tc.retval, tc.frame)
    assert rig.run(XDP, frame).retval == REDIRECT_XDP  # unmarked: XDP forwards it


def test_on_a_hybrid_device_tc_leaves_new_tuples_to_xdp(rig: Rig) -> None:
    frame = model.build_frame(ENCAPS["none"], model.l3_packet(4, "udp"))
    rig.dp.set_iface(LO, hybrid=True)
    assert rig.run(TC, frame).retval == PASS_TC
    assert list(rig.dp.pending_entries()) == [] and rig.take_events() == []
    assert rig.run(XDP, frame).retval == PASS_XDP
    assert len(list(rig.dp.pending_entries())) == 1 and len(rig.take_events()) == 1


def test_without_the_hybrid_flag_tc_notes_new_tuples(rig: Rig) -> None:
    frame = model.build_frame(ENCAPS["none"], model.l3_packet(4, "udp"))
    assert rig.run(TC, frame).retval == PASS_TC
    assert len(list(rig.dp.pending_entries())) == 1
