"""openwrt/Makefile: what an OpenWrt feed package needs, and where files land.

The static checks read the Makefile for the variables, sections and
dependencies a feed package must have. The install check runs the Makefile's
own recipes with GNU make against harness/buildroot, a stand-in for the parts
of an OpenWrt buildroot it includes (no OpenWrt SDK exists on this machine), and
looks at the tree the package would contain.
"""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

from .owrt_sandbox import FILES, REPO

MAKEFILE = REPO / "openwrt" / "Makefile"
BUILDROOT = Path(__file__).resolve().parent / "harness" / "buildroot"


def text() -> str:
    return MAKEFILE.read_text()


def variable(name: str) -> str:
    match = re.search(rf"^{re.escape(name)}\s*[:?]?=\s*(.*)$", text(), re.M)
    assert match, f"{name} is not set"
    return match.group(1).strip()


def define(name: str) -> str:
    match = re.search(rf"^define {re.escape(name)}\n(.*?)^endef$", text(), re.M | re.S)
    assert match, f"define {name} is missing"
    return match.group(1)


def test_includes_in_order() -> None:
    includes = re.findall(r"^include (\S+)$", text(), re.M)
    assert includes == [
        "$(TOPDIR)/rules.mk",
        "$(INCLUDE_DIR)/kernel.mk",
        "$(INCLUDE_DIR)/package.mk",
        "$(INCLUDE_DIR)/bpf.mk",
        "$(PYTHON3_PACKAGE_MK)",
    ]
    assert variable("PYTHON3_PACKAGE_MK").endswith("/lang/python/python3-package.mk")


def test_package_variables() -> None:
    assert variable("PKG_NAME") == "ebpf-offloader"
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert variable("PKG_VERSION") == version
    assert variable("PKG_RELEASE").isdigit()
    assert variable("PKG_LICENSE")
    assert variable("PKG_MAINTAINER")
    assert "bpf-headers" in variable("PKG_BUILD_DEPENDS").split()


def test_package_section() -> None:
    body = define("Package/ebpf-offloader")
    for key in ("SECTION", "CATEGORY", "TITLE", "DEPENDS"):
        assert re.search(rf"^\s+{key}:=\S", body, re.M), key
    depends = body.split("DEPENDS:=", 1)[1].replace("\\\n", " ").split("\n", 1)[0].split()
    for dep in (
        "+python3-light",
        "+python3-pyroute2",
        "+python3-cffi",
        "+libbpf",
        "+kmod-sched-bpf",
        "+kmod-nf-conntrack-netlink",
        "$(BPF_DEPENDS)",
    ):
        assert dep in depends, dep
    assert define("Package/ebpf-offloader/description").strip()


def test_conffiles() -> None:
    assert define("Package/ebpf-offloader/conffiles").split() == ["/etc/config/ebpf-offloader"]


def test_compile_uses_compilebpf_and_python_build() -> None:
    body = define("Build/Compile")
    assert "$(call CompileBPF,$(PKG_BUILD_DIR)/bpf/offload.bpf.c" in body
    assert "$(call Py3Build/Compile)" in body


def test_build_package_calls() -> None:
    tail = text().rstrip().splitlines()[-2:]
    assert tail == [
        "$(eval $(call Py3Package,ebpf-offloader))",
        "$(eval $(call BuildPackage,ebpf-offloader))",
    ]


def test_recipes_are_tab_indented() -> None:
    for name in ("Build/Prepare", "Build/Compile", "Py3Package/ebpf-offloader/install"):
        for line in define(name).splitlines():
            if line.strip():
                assert line.startswith("\t"), f"{name}: {line!r}"


def test_every_shipped_file_is_installed() -> None:
    install = define("Py3Package/ebpf-offloader/install")
    for path in FILES.iterdir():
        assert f"./files/{path.name}" in install, path.name


def test_maintainer_scripts_are_shell() -> None:
    for name in ("postinst", "prerm"):
        body = define(f"Package/ebpf-offloader/{name}")
        assert body.startswith("#!/bin/sh\n")
        assert "IPKG_INSTROOT" in body  # do nothing when building an image


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make not installed")
def test_install_tree(tmp_path: Path) -> None:
    # Linked into a buildroot's package/ folder, the way docs/openwrt.md says.
    package = tmp_path / "package" / "ebpf-offloader"
    package.parent.mkdir()
    package.symlink_to(REPO / "openwrt")
    root = tmp_path / "root"
    build = tmp_path / "build"
    build.mkdir()
    make = [
        "make",
        "-s",
        "-C",
        str(package),
        f"TOPDIR={BUILDROOT}",
        f"BUILD_DIR={build}",
        f"DESTDIR={root}",
    ]
    source = subprocess.run(
        [*make, "print-EBPF_OFFLOADER_SRC"], capture_output=True, text=True, check=True
    )
    assert Path(source.stdout.strip()) == REPO

    proc = subprocess.run([*make, "install"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    compiled = (build / "compile.log").read_text().split()
    assert compiled[1].endswith("/bpf/offload.bpf.c")

    def mode(path: str) -> int:
        return stat.S_IMODE((root / path.lstrip("/")).stat().st_mode)

    executables = [
        "/usr/bin/ebpf-offloader",
        "/etc/init.d/ebpf-offloader",
        "/usr/libexec/rpcd/ebpf-offloader",
        "/usr/share/ebpf-offloader/fw4-include.sh",
        "/etc/uci-defaults/90-ebpf-offloader",
    ]
    for path in executables:
        assert mode(path) & 0o111, path
    data = [
        "/lib/bpf/ebpf-offloader.o",
        "/etc/hotplug.d/net/30-ebpf-offloader",
        "/usr/share/rpcd/acl.d/ebpf-offloader.json",
    ]
    for path in data:
        assert (root / path.lstrip("/")).is_file(), path
    assert mode("/etc/config/ebpf-offloader") == 0o600
    assert (root / "etc/config/ebpf-offloader").read_text() == (
        FILES / "ebpf-offloader.config"
    ).read_text()
    site = root / "usr/lib/python3.11/site-packages/offloader"
    assert (site / "config.py").is_file()
    assert (site / "__init__.py").is_file()
