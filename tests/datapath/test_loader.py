"""The libbpf binding against the real kernel: load errors with the verifier
log, map sizing, pinning and re-use, batch operations, the ring buffer, and
attach/detach of both hooks."""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from offloader import bpfobj
from offloader.datapath import Datapath, FlowKey, L2Header, Verdict
from offloader.errors import AttachError, MapError, ObjectLoadError
from tests.nsutil import inside, namespaces, veth

BAD_PROG = r"""
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
SEC("xdp")
int bad(struct xdp_md *ctx)
{
	/* reads past the packet without a bounds check: the verifier refuses */
	return *(unsigned char *)(long)ctx->data;
}
char LICENSE[] SEC("license") = "GPL";
"""


@pytest.fixture(scope="module")
def bad_object(tmp_path_factory: pytest.TempPathFactory, bpf_object: Path) -> Path:
    d = tmp_path_factory.mktemp("bad")
    src, obj = d / "bad.bpf.c", d / "bad.bpf.o"
    src.write_text(BAD_PROG)
    arch = subprocess.run(["gcc", "-print-multiarch"], capture_output=True, text=True).stdout.strip()
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", f"-I/usr/include/{arch}", "-c", str(src),
                    "-o", str(obj)], check=True)
    return obj


def test_verifier_rejection_carries_the_log(bad_object: Path) -> None:
    obj = bpfobj.BpfObject(bad_object)
    try:
        with pytest.raises(ObjectLoadError) as info:
            obj.load()
    finally:
        obj.close()
    err = info.value
    assert err.errno == 13  # EACCES from the verifier
    assert "invalid access to packet" in err.log
    assert "Permission denied" in str(err)


def test_missing_object_is_a_clear_error() -> None:
    with pytest.raises(ObjectLoadError, match="cannot open BPF object /nonexistent.o"):
        bpfobj.BpfObject("/nonexistent.o")


def key(i: int) -> FlowKey:
    return FlowKey(ifindex=1, family=socket.AF_INET, proto=17,
                   src=ipaddress.ip_address("198.18.0.1"), dst=ipaddress.ip_address("198.19.0.1"),
                   sport=1000 + i, dport=53)


@pytest.fixture
def dp(bpf_object: Path) -> Iterator[Datapath]:
    d = Datapath(str(bpf_object), max_flows=2048, pending_flows=512, ring_bytes=512 * 1024)
    d.configure()
    yield d
    d.close()


def test_maps_are_sized_before_load(dp: Datapath) -> None:
    assert dp.flows.max_entries == 2048
    assert dp.pending.max_entries == 512
    assert dp.events.max_entries == 512 * 1024  # event_ring_kib


def test_batch_lookup_and_delete(dp: Datapath) -> None:
    for i in range(1500):  # more than one batch of 1024
        dp.mark_pass(key(i))
    entries = list(dp.flow_entries())
    assert len(entries) == 1500
    assert {e.key.sport for e in entries} == {1000 + i for i in range(1500)}
    assert dp.remove([key(i) for i in range(1000)]) == 1000
    assert len(list(dp.flows.keys())) == 500
    assert dp.flows.clear() == 500
    assert dp.flows.lookup(key(1).pack()) is None


def test_clear_deletes_every_batch_as_it_walks(dp: Datapath) -> None:
    # clear() deletes each batch the walk read before it reads the next.
    for i in range(1800):
        dp.mark_pass(key(i))
    assert dp.flows.clear() == 1800
    assert list(dp.flows.keys()) == []


def test_batch_delete_goes_on_past_a_missing_key(dp: Datapath) -> None:
    # A key gone in between (a concurrent delete, an LRU eviction) makes the
    # kernel stop the batch with ENOENT: the keys after it must go too.
    for i in range(10):
        dp.mark_pass(key(i))
    dp.flows.delete(key(3).pack())
    assert dp.flows.delete_batch([key(i).pack() for i in range(10)]) == 9
    assert list(dp.flows.keys()) == []


def test_an_offloaded_flow_is_stamped_when_written(dp: Datapath) -> None:
    # Stamped at write time: one that never carries a packet still idles out.
    before = time.monotonic_ns()
    v = Verdict(oif=1, l2=L2Header(b"\x02" * 6, b"\x04" * 6), mtu=1500, key=key(1))
    dp.offload(key(1), v)
    (entry,) = list(dp.flow_entries())
    assert before <= entry.last_seen_ns <= time.monotonic_ns()


def test_a_late_offload_keeps_the_entry_and_its_counters(dp: Datapath) -> None:
    # The agent offloads with replace=False: a late ring record or event for
    # a flow decided already must not reset its counters.
    v = Verdict(oif=1, l2=L2Header(b"\x02" * 6, b"\x04" * 6), mtu=1500, key=key(2))
    assert dp.offload(key(2), v, replace=False)
    raw = dp.flows.lookup(key(2).pack())
    assert raw is not None
    f = dp.layout.from_bytes("struct ofl_flow", raw)
    f.packets = 77
    dp.flows.update(key(2).pack(), dp.layout.to_bytes(f))
    assert not dp.offload(key(2), v, replace=False)
    (entry,) = list(dp.flow_entries())
    assert entry.packets == 77
    dp.mark_pass(key(2))  # a pass entry (probation) is replaced
    assert dp.offload(key(2), v, replace=False)


def test_a_full_flow_map_says_so(dp: Datapath) -> None:
    for i in range(2048):
        dp.mark_pass(key(i))
    with pytest.raises(MapError) as exc:
        dp.mark_pass(key(5000))
    assert exc.value.errno == errno.E2BIG  # what the agent's flow table looks for


def test_map_errors_say_which_map(dp: Datapath) -> None:
    with pytest.raises(MapError, match="ofl_flows: key is 3 bytes"):
        dp.flows.lookup(b"abc")


def test_ring_buffer_delivers_new_tuples(dp: Datapath) -> None:
    got: list[bytes] = []
    ring = bpfobj.RingBuffer(dp.events, got.append)
    try:
        from scapy.layers.inet import IP, UDP
        from scapy.layers.l2 import Ether

        frame = bytes(Ether() / IP(src="198.18.0.1", dst="198.19.0.1") / UDP(sport=7, dport=9))
        ctx = struct.pack("6I", 0, len(frame), 0, 1, 0, 0)
        assert dp.xdp.test_run(frame, ctx).retval == 2  # XDP_PASS
        readable, _, _ = select.select([ring.fd], [], [], 2.0)
        assert readable, "the ring buffer's epoll fd never became readable"
        assert ring.consume() == 1
        event_key = FlowKey.unpack(got[0][:52])
        assert (event_key.sport, event_key.dport, str(event_key.dst)) == (7, 9, "198.19.0.1")
        assert dp.stats()["new"] == 1
        assert dp.pending_first_seen(event_key) > 0
    finally:
        ring.close()


def test_pinned_maps_are_reused(bpf_object: Path, tmp_path: Path) -> None:
    if not bpfobj.is_bpffs(Path("/sys/fs/bpf")):
        subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], check=False)
    if not bpfobj.is_bpffs(Path("/sys/fs/bpf")):
        pytest.fail("/sys/fs/bpf is not a BPF filesystem and cannot be mounted")
    pin = Path("/sys/fs/bpf") / f"ofltest-{os.getpid()}"
    try:
        first = Datapath(str(bpf_object), max_flows=1024, pin_dir=pin)
        first.mark_pass(key(1))
        first.close()
        assert (pin / "ofl_flows").exists()
        second = Datapath(str(bpf_object), max_flows=1024, pin_dir=pin)
        try:
            assert [e.key for e in second.flow_entries()] == [key(1)]
        finally:
            second.close()
        # A different size cannot re-use the pins: they are replaced, not an error.
        third = Datapath(str(bpf_object), max_flows=4096, pin_dir=pin)
        try:
            assert third.flows.max_entries == 4096
            assert list(third.flow_entries()) == []
        finally:
            third.close()
    finally:
        subprocess.run(["rm", "-rf", str(pin)], check=False)


def _prog_ids(ns: Any, dev: str) -> str:
    return ns.run(f"ip -d link show {dev}").stdout + ns.run(f"tc filter show dev {dev} ingress").stdout


def test_attach_and_detach_both_hooks(dp: Datapath) -> None:
    with namespaces("a", "b") as (a, b):
        veth(a, "e0", b, "e1")
        index = a.ifindex("e0")
        with inside(a):  # our binding works on the calling thread's namespace
            mode = bpfobj.xdp_attach(index, dp.xdp, "auto")
            assert mode == "xdp"  # veth has native XDP
            assert bpfobj.xdp_prog_id(index, "xdp") > 0
            assert "prog/xdp" in _prog_ids(a, "e0")
            bpfobj.xdp_detach(index, "xdp")
            assert bpfobj.xdp_prog_id(index, "xdp") == 0
            bpfobj.tc_attach(index, dp.tc)
            assert bpfobj.tc_attached(index)
            assert "ofl_tc" in _prog_ids(a, "e0")
            bpfobj.tc_detach(index)
            assert not bpfobj.tc_attached(index)
            with pytest.raises(AttachError):
                bpfobj.xdp_attach(99999, dp.xdp, "xdp")
