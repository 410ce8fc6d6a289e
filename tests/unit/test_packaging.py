"""A plain ``pip install .`` carries the BPF object: setup.py builds it into the
wheel, and the agent finds it there without a checkout's build/ folder."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from offloader import datapath
from offloader.datapath import OBJECT_SEARCH
from offloader.errors import OffloadError
from tests.conftest import ROOT

EM_BPF = 247
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "CMakeLists.txt", "README.md", "bpf",
           "offloader")


def copy_tree(dest: Path) -> Path:
    """The files a build reads, without the checkout's build/ folder."""
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def sections(obj: bytes) -> set[str]:
    (shoff,) = struct.unpack_from("<Q", obj, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", obj, 0x3A)
    heads = [struct.unpack_from("<IIQQQQ", obj, shoff + i * shentsize) for i in range(shnum)]
    names = obj[heads[shstrndx][4]:heads[shstrndx][4] + heads[shstrndx][5]]
    return {names[h[0]:names.index(b"\0", h[0])].decode() for h in heads}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("clang") is None or shutil.which("cmake") is None:
        pytest.skip("needs clang and cmake (scripts/setup.sh installs them)")
    src = copy_tree(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out),
                           str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = out.glob("ebpf_offloader-*.whl")
    return whl


def test_wheel_carries_the_bpf_object(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        obj = zf.read("offloader/offload.bpf.o")
        assert "offloader/offload.h" in zf.namelist()
    assert obj[:4] == b"\x7fELF"
    assert struct.unpack_from("<H", obj, 0x12)[0] == EM_BPF
    built = ROOT / "build" / "offload.bpf.o"
    if built.is_file():  # the same programs and maps as the cmake build
        want = {s for s in sections(built.read_bytes()) if s in ("xdp", "tc", ".maps")}
        assert want and want <= sections(obj)


def test_installed_package_finds_its_object(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    env = {k: v for k, v in os.environ.items() if k != "EBPF_OFFLOADER_OBJECT"}
    env["PYTHONPATH"] = str(site)
    proc = subprocess.run([sys.executable, "-c", "from offloader.datapath import find_object;"
                           "import offloader; print(find_object()); print(offloader.__file__)"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    found, package = proc.stdout.split()
    assert Path(package).is_relative_to(site)
    if not any(Path(p).is_file() for p in ("/lib/bpf/ebpf-offloader.o",
                                            "/usr/lib/ebpf-offloader/offload.bpf.o")):
        assert found == str(site / "offloader" / "offload.bpf.o")


def test_build_without_clang_says_what_is_missing(tmp_path: Path) -> None:
    src = copy_tree(tmp_path)
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py"], cwd=src,
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": str(tmp_path / "empty"), "HOME": str(tmp_path)})
    assert proc.returncode != 0
    assert "building the BPF object needs cmake and clang" in proc.stderr
    assert not (src / "build" / "lib" / "offloader" / "offload.bpf.o").exists()


def test_missing_object_says_where_and_how(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EBPF_OFFLOADER_OBJECT", raising=False)
    monkeypatch.setattr(datapath, "OBJECT_SEARCH", ("/nonexistent/offload.bpf.o",))
    with pytest.raises(OffloadError, match=r"--object PATH or EBPF_OFFLOADER_OBJECT=PATH;"
                                           r" looked in /nonexistent/offload.bpf.o"):
        datapath.find_object()
    assert any(p.endswith("/offloader/offload.bpf.o") for p in OBJECT_SEARCH)  # the wheel's place
