"""Bad input to `run` (docs/reliability.md): each refused start exits non-zero
with one clear sentence, and nothing is attached, pinned or left behind.

The agent runs under ``nsenter --net`` in the lab's router namespace, with
the host's mounts: what it would pin is visible at its per-namespace path."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from offloader.lab import Topology, lab_network
from tests.conftest import need_root

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))


@pytest.fixture(scope="module")
def lab(bpf_object: Any) -> Iterator[Topology]:
    need_root()
    with lab_network() as topo:
        # A new namespace may get the inode of a deleted one whose pins an
        # earlier run left behind: they are no live agent's.
        shutil.rmtree(_pin_dir(topo), ignore_errors=True)
        # A device without native XDP (vxlan's driver has no ndo_bpf).
        topo.router.sh("ip link add vx0 type vxlan id 42 dstport 4789 dev wan0 && "
                       "ip link set vx0 up")
        yield topo


def _pin_dir(lab: Topology) -> Path:
    return Path(lab.pin_dir())


def _run(lab: Topology, *args: str, wrap: tuple[str, ...] = (),
         timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nsenter", f"--net=/run/netns/{lab.router.name}", *wrap, sys.executable, "-m",
         "offloader.cli", "run", *args],
        capture_output=True, text=True, timeout=timeout, env=ENV)


def _nothing_left(lab: Topology) -> None:
    links = lab.router.sh("ip -d link show").stdout
    assert "xdp" not in links, links
    for dev in ("br-lan", "lan1p", "lan2p", "wan0", "vx0"):
        filters = lab.router.sh(f"tc filter show dev {dev} ingress").stdout
        assert filters.strip() == "", f"{dev}: {filters}"
    assert not _pin_dir(lab).exists(), sorted(os.listdir(_pin_dir(lab)))
    assert lab.cli("status", check=False).returncode == 1  # the control address is free
    pids = subprocess.run(["ip", "netns", "pids", lab.router.name], capture_output=True,
                          text=True).stdout.split()
    assert pids == [], pids


def _one_sentence(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode != 0, proc
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_a_config_error(lab: Topology, tmp_path: Path) -> None:
    conf = tmp_path / "ebpf-offloader"
    conf.write_text("config offloader 'main'\n\toption enabled '1'\n\toption max_flows 'lots'\n")
    proc = _run(lab, "-c", str(conf), "-i", "br-lan")
    assert proc.returncode == 2
    _one_sentence(proc, f"{conf}:3: max_flows:")
    _nothing_left(lab)


def test_an_unknown_interface(lab: Topology) -> None:
    # Given after a good one: the good one must not stay attached.
    _one_sentence(_run(lab, "-i", "wan0", "-i", "nosuch0", "--hook", "xdp"), "nosuch0")
    _nothing_left(lab)


def test_no_native_xdp_under_hook_xdp(lab: Topology) -> None:
    _one_sentence(_run(lab, "-i", "wan0", "-i", "vx0", "--hook", "xdp"),
                  "vx0", "no native XDP")
    _nothing_left(lab)


def test_no_native_xdp_under_auto_falls_back_and_says_so(lab: Topology) -> None:
    agent = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{lab.router.name}", sys.executable, "-m", "offloader.cli",
         "run", "-i", "vx0", "--hook", "auto"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 15
        st = None
        while st is None and time.monotonic() < deadline and agent.poll() is None:
            st = lab.status(check=False)
            time.sleep(0.1)
        assert st is not None, agent.stdout.read() if agent.stdout else ""
        assert [(i["name"], i["hook"]) for i in st["interfaces"]] == [("vx0", "tc")]
    finally:
        agent.send_signal(signal.SIGTERM)
        out, _ = agent.communicate(timeout=15)
    assert agent.returncode == 0, out
    assert "vx0: no native XDP (its driver has none), using TC" in out, out
    # A clean stop keeps its pins for the next start to adopt; remove them here.
    shutil.rmtree(_pin_dir(lab))
    _nothing_left(lab)


def test_the_object_missing(lab: Topology) -> None:
    _one_sentence(_run(lab, "-i", "wan0", "--object", "/nonexistent/offload.bpf.o"),
                  "/nonexistent/offload.bpf.o", "does not exist")
    _nothing_left(lab)


def test_an_object_from_another_build(lab: Topology, bpf_object: Path, tmp_path: Path) -> None:
    # The same source with a reordered key (same sizes, other offsets).
    src = tmp_path / "bpf"
    shutil.copytree(ROOT / "bpf", src)
    header = src / "offload.h"
    header.write_text(header.read_text().replace("\t__u8 family;", "\t__u8 fam_x;")
                      .replace("\t__u8 proto;", "\t__u8 family;").replace("\t__u8 fam_x;",
                                                                          "\t__u8 proto;"))
    foreign = tmp_path / "foreign.bpf.o"
    arch = subprocess.run(["gcc", "-print-multiarch"], capture_output=True,
                          text=True).stdout.strip()
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", f"-I{src}", "-idirafter",
                    f"/usr/include/{arch}", "-c", str(src / "offload.bpf.c"), "-o", str(foreign)],
                   check=True)
    _one_sentence(_run(lab, "-i", "wan0", "--object", str(foreign)),
                  "built from another bpf/offload.h")
    _nothing_left(lab)


def test_not_root(lab: Topology) -> None:
    # uid 0 without capabilities: what a user lacks (an unprivileged uid could
    # not even read this machine's Python, installed under /root).
    proc = _run(lab, "-i", "wan0", wrap=("setpriv", "--inh-caps=-all", "--bounding-set=-all"))
    _one_sentence(proc, "needs root")
    _nothing_left(lab)


def test_no_bpf_filesystem_in_the_root_namespace(bpf_object: Path) -> None:
    # A namespace of its own where the agent is PID 1's neighbour, i.e. in the
    # "root" network namespace as it sees it, and /sys/fs/bpf is a tmpfs.
    need_root()
    proc = subprocess.run(
        ["unshare", "-p", "-f", "-m", "-n", "--mount-proc", "sh", "-c",
         f"mount -t tmpfs none /sys/fs/bpf && {sys.executable} -m offloader.cli run -i lo; "
         "echo rc=$?; ls -A /sys/fs/bpf"],
        capture_output=True, text=True, timeout=30, env=ENV)
    assert proc.stdout.split() == ["rc=1"], proc  # and nothing created in /sys/fs/bpf
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "is not a BPF filesystem" in err, err
