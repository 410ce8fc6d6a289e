"""The layout stamp (bpf/offload.h, OFL_LAYOUT): an object built from another
version of the shared header is refused before libbpf opens it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from offloader.datapath import Datapath
from offloader.errors import ObjectLoadError
from offloader.layout import layout, object_stamp

ROOT = Path(__file__).resolve().parents[2]


def _build(src_dir: Path, out: Path) -> Path:
    arch = subprocess.run(["gcc", "-print-multiarch"], capture_output=True,
                          text=True).stdout.strip()
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", "-Wall", "-Werror", f"-I{src_dir}",
                    "-idirafter", f"/usr/include/{arch}", "-c", str(src_dir / "offload.bpf.c"),
                    "-o", str(out)], check=True)
    return out


def test_the_built_object_carries_this_headers_stamp(bpf_object: Path) -> None:
    assert object_stamp(str(bpf_object)) == layout().stamp_table


def test_an_object_from_another_header_is_refused(bpf_object: Path, tmp_path: Path) -> None:
    # Another build: the same source with two key fields swapped in the header
    # (same sizes, different offsets), as a branch that reorders a struct would.
    src = tmp_path / "bpf"
    shutil.copytree(ROOT / "bpf", src)
    header = src / "offload.h"
    text = header.read_text()
    swapped = text.replace("\t__be16 sport;\n\t__be16 dport;\n", "\t__be16 dport;\n\t__be16 sport;\n")
    assert swapped != text
    header.write_text(swapped)
    foreign = _build(src, tmp_path / "foreign.bpf.o")
    assert object_stamp(str(foreign)) not in (None, layout().stamp_table)
    with pytest.raises(ObjectLoadError, match="built from another bpf/offload.h") as info:
        Datapath(str(foreign), max_flows=1024)
    assert layout().stamp in str(info.value)


def test_an_object_without_a_stamp_is_refused(bpf_object: Path, tmp_path: Path) -> None:
    # The object of an older build: the same program without the stamp section.
    bare = tmp_path / "bare.bpf.o"
    subprocess.run(["llvm-objcopy", "--rename-section=ofl_layout=ofl_older", str(bpf_object), str(bare)],
                   check=True)
    assert object_stamp(str(bare)) is None
    with pytest.raises(ObjectLoadError, match="has no layout stamp"):
        Datapath(str(bare), max_flows=1024)
