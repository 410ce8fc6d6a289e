"""Build hook: a wheel (``pip install .``, ``pip wheel .``) carries the BPF
object as ``offloader/offload.bpf.o``, compiled here through CMakeLists.txt.

Everything else is in pyproject.toml. An editable install (``pip install -e
.``) skips this: the agent then finds ``build/offload.bpf.o`` of the checkout.
``EBPF_OFFLOADER_NO_BPF=1`` skips it too (a packager who installs the object
elsewhere, as OpenWrt's package does in /lib/bpf).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
OBJECT = "offload.bpf.o"


class BuildPyWithBpf(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False) or os.environ.get("EBPF_OFFLOADER_NO_BPF") == "1":
            return
        missing = [tool for tool in ("cmake", "clang") if shutil.which(tool) is None]
        if missing:
            raise SystemExit(
                f"ebpf-offloader: building the BPF object needs {' and '.join(missing)}"
                " (Debian: apt-get install cmake clang llvm libbpf-dev), or set"
                " EBPF_OFFLOADER_NO_BPF=1 and point the agent at an object with --object")
        tmp = Path(self.get_finalized_command("build").build_temp) / "bpf"
        for cmd in (["cmake", "-S", str(ROOT), "-B", str(tmp)], ["cmake", "--build", str(tmp)]):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"ebpf-offloader: {' '.join(cmd)} failed:\n"
                                 f"{proc.stdout}{proc.stderr}")
        target = Path(self.build_lib) / "offloader" / OBJECT
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp / OBJECT, target)


setup(cmdclass={"build_py": BuildPyWithBpf})
