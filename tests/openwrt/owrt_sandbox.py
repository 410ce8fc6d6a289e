"""Sandbox for running the package's shell scripts on Debian.

OpenWrt's shell library (/etc/rc.common, /lib/functions.sh, procd.sh) and its
programs (ubus, uci, logger's syslog) do not exist here. harness/rc-common.sh
stands in for the library and records every call; the programs are replaced by
fakes in a temporary PATH that record their arguments in the same log.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FILES = REPO / "openwrt" / "files"
HARNESS = Path(__file__).resolve().parent / "harness" / "rc-common.sh"
PROG = "/usr/bin/ebpf-offloader"

# Both shells a script may meet: BusyBox ash is OpenWrt's /bin/sh, dash is
# Debian's and the strictest POSIX one here.
SHELLS = [s for s in (["busybox", "sh"], ["dash"]) if shutil.which(s[0])]

# A fake program: records "NAME<TAB>ARG..." (and its stdin if FAKE_STDIN_<NAME>
# is set), prints $FAKE_OUT_<NAME> / $FAKE_ERR_<NAME>, exits $FAKE_RC_<NAME>.
FAKE = """#!/bin/sh
name={name}
IFS='\t'
printf '%s\\n' "$name${{1+\t}}$*" >>"$CALLS"
eval "stdin=\\${{FAKE_STDIN_$name:-}}"
[ -n "$stdin" ] && sed 's/^/  stdin: /' >>"$CALLS"
eval "out=\\${{FAKE_OUT_$name:-}}; err=\\${{FAKE_ERR_$name:-}}; rc=\\${{FAKE_RC_$name:-0}}"
[ -n "$out" ] && printf '%s\\n' "$out"
[ -n "$err" ] && printf '%s\\n' "$err" >&2
exit "$rc"
"""


@dataclass
class Run:
    returncode: int
    calls: list[list[str]]
    stdout: str
    stderr: str

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def find(self, *prefix: str) -> list[list[str]]:
        return [c for c in self.calls if c[: len(prefix)] == list(prefix)]


class Sandbox:
    """A temporary /etc/config, PATH of fakes and call log for one test."""

    def __init__(self, root: Path, shell: list[str]) -> None:
        self.root = root
        self.shell = shell
        self.bin = root / "bin"
        self.uci_dir = root / "config"
        self.calls = root / "calls"
        self.bin.mkdir()
        self.uci_dir.mkdir()
        self.env: dict[str, str] = {}
        for name in ("ebpf-offloader", "ubus", "uci", "logger"):
            self.fake(name)

    def fake(self, name: str) -> Path:
        path = self.bin / name
        path.write_text(FAKE.format(name=name.replace("-", "_")))
        path.chmod(0o755)
        return path

    def set_fake(self, name: str, *, out: str = "", err: str = "", rc: int = 0) -> None:
        key = name.replace("-", "_")
        self.env[f"FAKE_OUT_{key}"] = out
        self.env[f"FAKE_ERR_{key}"] = err
        self.env[f"FAKE_RC_{key}"] = str(rc)

    def uci(self, name: str, text: str) -> None:
        (self.uci_dir / name).write_text(text)

    def script(self, name: str, replace: dict[str, str] | None = None) -> Path:
        """A copy of openwrt/files/NAME with absolute paths pointed into the sandbox."""
        text = (FILES / name).read_text()
        text = text.replace(PROG, str(self.bin / "ebpf-offloader"))
        for old, new in (replace or {}).items():
            assert old in text, f"{name} no longer mentions {old}"
            text = text.replace(old, new)
        path = self.root / name
        path.write_text(text)
        path.chmod(0o755)
        return path

    def run(self, argv: list[str], env: dict[str, str] | None = None, stdin: str = "") -> Run:
        self.calls.write_text("")
        full_env = {
            "PATH": f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "CALLS": str(self.calls),
            "UCI_DIR": str(self.uci_dir),
            **self.env,
            **(env or {}),
        }
        proc = subprocess.run(
            [*self.shell, *argv], env=full_env, capture_output=True, text=True, timeout=30,
            input=stdin,
        )
        calls = [line.split("\t") for line in self.calls.read_text().splitlines()]
        return Run(proc.returncode, calls, proc.stdout, proc.stderr)

    def init(self, action: str, *, running: bool = False) -> Run:
        script = self.script("ebpf-offloader.init")
        return self.run(
            [str(HARNESS), str(script), action], env={"RUNNING": "1" if running else "0"}
        )
