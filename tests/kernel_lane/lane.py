"""Second-kernel lane runner: boot Debian's 6.1 kernel under qemu (virtme-ng, software
emulation) with this machine's userland, run ONE pytest module inside, bring the
result back.

How results come back: the guest sees the host's root filesystem read-only over 9p,
and its /tmp is an overlay whose writes stay in the guest. So the runner makes a host
directory under /tmp and hands it to the guest with `vng --rwdir`; the guest's pytest
writes its output (pytest.log), a junit XML (junit.xml) and its exit status (rc) there.
The runner also polls for a `started` marker the guest writes first, which gives the
boot time on the host's clock.

Use from Python (see test_lane.py) or by hand:

    python tests/kernel_lane/lane.py tests/kernel_lane/guest_vlan.py [-k EXPR] [--timeout S]
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
KERNEL_GLOB = "/boot/vmlinuz-6.1.0-*-amd64"
SETUP_CMD = "scripts/setup-kernel-lane.sh"
DEFAULT_TIMEOUT = float(os.environ.get("KERNEL_LANE_TIMEOUT", "240"))


class LaneUnavailable(RuntimeError):
    """The lane cannot run here (no kernel, no vng, no qemu); message says how to fix."""


def _version_key(path: str) -> list:
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", path)]


def find_kernel() -> str | None:
    """The 6.1 vmlinuz to boot: $KERNEL_LANE_VMLINUZ, else the newest
    /boot/vmlinuz-6.1.0-*-amd64 (never the -cloud flavour, which lacks ppp)."""
    env = os.environ.get("KERNEL_LANE_VMLINUZ")
    if env:
        return env if os.path.exists(env) else None
    cands = [k for k in glob.glob(KERNEL_GLOB) if "cloud" not in k]
    if not cands:
        return None
    return sorted(cands, key=_version_key)[-1]


def find_vng() -> str | None:
    """`vng` on PATH, else beside this Python (a venv's bin, pyenv's version bin)."""
    p = shutil.which("vng")
    if p:
        return p
    beside = Path(sys.executable).parent / "vng"
    return str(beside) if beside.exists() else None


def unavailable_reason() -> str | None:
    """None when the lane can run, else what is missing and the command that fixes it."""
    missing = []
    if find_kernel() is None:
        missing.append(f"no kernel {KERNEL_GLOB}")
    if find_vng() is None:
        missing.append("no vng (virtme-ng)")
    if shutil.which("qemu-system-x86_64") is None:
        missing.append("no qemu-system-x86_64")
    if shutil.which("busybox") is None:
        missing.append("no busybox")
    if not missing:
        return None
    return ", ".join(missing) + f"; install with: sudo {SETUP_CMD}"


@dataclasses.dataclass
class LaneResult:
    module: str
    kernel: str
    command: list[str]
    vng_rc: int | None  # exit status of vng (the guest command's status when it ran)
    pytest_rc: int | None  # the guest pytest's exit status, None if it never finished
    timed_out: bool
    boot_seconds: float | None  # host clock: vng start -> guest script started
    guest_seconds: float | None  # guest script start -> pytest finished (host clock)
    total_seconds: float
    guest_uname: str
    pytest_log: str
    console: str  # vng/qemu/kernel output
    counts: dict  # tests, failures, errors, skipped (from junit XML)
    cases: list  # [(nodeid, outcome)]
    shared_dir: str
    killed_by: str = ""  # why the watchdog stopped the guest, if it did
    cached: str = ""  # the directories the guest mounted with 9p's cache, or why not

    @property
    def passed(self) -> bool:
        c = self.counts
        return (
            not self.timed_out
            and self.pytest_rc == 0
            and c.get("tests", 0) > 0
            and c.get("failures", 0) == 0
            and c.get("errors", 0) == 0
            and c.get("skipped", 0) == 0  # a skip inside the lane proves nothing
        )

    def report(self, console_tail: int = 60) -> str:
        lines = [
            f"kernel lane: {self.module} on {self.kernel} (guest uname: {self.guest_uname or '?'})",
            f"  vng rc={self.vng_rc} pytest rc={self.pytest_rc} timed_out={self.timed_out}"
            + (f" ({self.killed_by})" if self.killed_by else ""),
            f"  boot {_fmt(self.boot_seconds)}, tests {_fmt(self.guest_seconds)}, "
            f"total {_fmt(self.total_seconds)}",
            f"  junit: {self.counts}",
            f"  9p cache: {self.cached or '(none)'}",
        ]
        for nodeid, outcome in self.cases:
            lines.append(f"    {outcome:8} {nodeid}")
        lines.append(f"  shared dir: {self.shared_dir}")
        lines.append(f"  command: {shlex.join(self.command)}")
        lines.append("----- guest pytest output -----")
        lines.append(self.pytest_log.rstrip() or "(none: pytest did not run or wrote nothing)")
        if not self.passed:
            tail = "\n".join(self.console.rstrip().splitlines()[-console_tail:])
            lines.append(f"----- vng console (last {console_tail} lines) -----")
            lines.append(tail or "(empty)")
        return "\n".join(lines)


    def durations(self) -> list[str]:
        """The guest pytest's own "slowest durations" table (its --durations=15),
        one line per test phase, slowest first: what to balance the boots by."""
        lines = self.pytest_log.splitlines()
        start = next((i for i, line in enumerate(lines) if "slowest" in line and "durations" in line
                      and line.startswith("=")), None)
        if start is None:
            return []
        table = []
        for line in lines[start + 1:]:
            if line.startswith("=") or not line.strip():
                break
            table.append(line.rstrip())
        return table


def _fmt(s: float | None) -> str:
    return "?" if s is None else f"{s:.1f}s"


def _parse_junit(path: Path) -> tuple[dict, list]:
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    cases: list = []
    if not path.exists():
        return counts, cases
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return counts, cases
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    for s in suites:
        for k in counts:
            counts[k] += int(s.get(k, 0))
        for tc in s.iter("testcase"):
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                if tc.find(tag) is not None:
                    outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "SKIPPED"}[tag]
            cases.append((f"{tc.get('classname', '')}::{tc.get('name', '')}", outcome))
    return counts, cases


def cached_dirs() -> list[str]:
    """Host directories the guest mounts a second time, read-only and with 9p's
    page and attribute cache (`cache=loose`), over the same paths: the host's
    userland (/usr), this Python's prefix (the interpreter, the stdlib and
    site-packages) and the repo. The root filesystem virtme-ng mounts has no
    cache, and under emulation every lookup there is a round trip to qemu's 9p
    server: a stat took 14 ms, so an agent's imports (about 1,100 stats, 260
    files opened) were 20 of its 43-52 s start (cProfile in the guest,
    2026-12-02). Nothing writes these directories while a guest runs (the
    runner byte-compiles the repo before the boot), so the cache cannot go
    stale. Empty with KERNEL_LANE_9P_CACHE=0; paths qemu's option syntax cannot
    carry (commas, blanks) are left out."""
    if os.environ.get("KERNEL_LANE_9P_CACHE", "1") == "0":
        return []
    out: list[str] = []
    for d in sorted({os.path.realpath(p) for p in ("/usr", sys.base_prefix, sys.prefix, REPO)},
                    key=len):
        inside = any(d == o or d.startswith(o + "/") for o in out)
        if os.path.isdir(d) and d != "/" and not inside and not re.search(r"[,\s]", d):
            out.append(d)
    return out


def _cache_qemu_opts(dirs: Sequence[str]) -> list[str]:
    """vng arguments that export each of `dirs` to the guest as 9p tag klcN."""
    opts = []
    for i, d in enumerate(dirs):
        opts += [f"-fsdev local,id=klc{i},path={d},security_model=none,readonly=on,"
                 f"multidevs=remap -device virtio-9p-pci,fsdev=klc{i},mount_tag=klc{i}"]
    return [f"--qemu-opts={' '.join(opts)}"] if opts else []


def _guest_script(module: Path, shared: Path, pytest_args: list[str],
                  cached: Sequence[str] = ()) -> str:
    py = sys.executable
    args = [
        py, "-m", "pytest", str(module),
        "-p", "no:cacheprovider",  # the repo is read-only in the guest
        "--noconftest",  # guest modules are self-contained; host conftests stay out
        "-v", "-rA", "--tb=short",
        "--durations=15",  # each case's time in the report, to balance the boots
        f"--junitxml={shared / 'junit.xml'}",
        *pytest_args,
    ]
    passed = "".join(
        f"export {k}={shlex.quote(v)}\n" for k, v in sorted(os.environ.items())
        if k.startswith("KERNEL_LANE_") and k not in ("KERNEL_LANE_GUEST", "KERNEL_LANE_SHARED")
    )
    mounts = "".join(
        f"mount -t 9p -o ro,trans=virtio,version=9p2000.L,cache=loose,msize=524288 klc{i} "
        f"{shlex.quote(d)} 2>> {shared}/mounts.err && echo {shlex.quote(d)} >> {shared}/mounts\n"
        for i, d in enumerate(cached))
    return f"""#!/bin/sh
echo started > {shared}/started
uname -r > {shared}/uname
# cached read-only views of the userland and the repo (lane.cached_dirs)
{mounts}cd {shlex.quote(str(REPO))}
export PYTHONDONTWRITEBYTECODE=1 KERNEL_LANE_GUEST=1 KERNEL_LANE_SHARED={shared}
# no third-party pytest plugins in the guest: each costs seconds of import under TCG
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
{passed}export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}
export PATH={shlex.quote(str(Path(py).parent))}:/usr/local/sbin:/usr/sbin:/sbin:$PATH
{shlex.join(args)} > {shared}/pytest.log 2>&1
rc=$?
echo $rc > {shared}/rc
exit $rc
"""


# Under TCG the guest's kernel picks the HPET as its clock source, and every clock
# read (the kernel's timekeeping, each bpf_ktime_get_ns() of the datapath, Python's
# time.monotonic()) becomes an emulated device access; the TSC is an instruction
# (bench/lane.py found XDP's packets per CPU-second 16-22k -> 35k with it).
CLOCK_ARGS = ("--append", "clocksource=tsc tsc=reliable")

# The repo's packages that guest processes import: the agent, the CLI, the lane's
# modules (and the lane benchmark's).
PRECOMPILED = ("offloader", "tests", "bench")


def precompile(repo: Path = REPO) -> None:
    """Byte-compiles the repo's Python on the host (into its __pycache__ dirs)
    before a boot. The guest reads the repo read-only over 9p and cannot write
    bytecode, so without it every Python start there (each agent, each CLI call)
    compiled the offloader package from source: about 5.7 s of an agent's 43-52 s
    start under emulation (cProfile in the guest, 2026-12-02). Hosts that run with
    PYTHONDONTWRITEBYTECODE (CI's) never write these files otherwise."""
    import compileall

    for name in PRECOMPILED:
        if (repo / name).is_dir():
            compileall.compile_dir(repo / name, quiet=1, workers=1)


def run_module(
    module: str | os.PathLike,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    pytest_args: list[str] | None = None,
    kernel: str | None = None,
    cpus: int = 2,
    memory: str = "2G",
    keep: bool | None = None,
    vng_args: Sequence[str] = (),
    watchdog: Callable[[Path, float], str | None] | None = None,
) -> LaneResult:
    """Boot the 6.1 kernel once and run one pytest module inside it.

    `timeout` bounds the whole boot + run; on expiry the vng process group (vng and
    qemu) is killed. `keep`: keep the shared dir (default: only when it failed).
    `vng_args` go to vng before --exec (e.g. `--append loglevel=4`). `watchdog(shared,
    elapsed)` is called at every poll; a non-empty reason it returns stops the guest
    as a timeout does (a caller's finer-grained deadline, e.g. per benchmark step)."""
    module = Path(module).resolve()
    if not module.exists():
        raise FileNotFoundError(module)
    kernel = kernel or find_kernel()
    vng = find_vng()
    why = unavailable_reason()
    if kernel is None or vng is None or why:
        raise LaneUnavailable(why or "kernel lane unavailable")

    precompile()
    shared = Path(tempfile.mkdtemp(prefix="klane-", dir="/tmp"))
    script = shared / "run.sh"
    cached = cached_dirs()
    script.write_text(_guest_script(module, shared, list(pytest_args or []), cached))
    cmd = [
        vng, "-r", kernel, "--disable-kvm", "--cpus", str(cpus), "--memory", memory,
        "--user", "root", "--cwd", str(REPO), "--rwdir", str(shared),
        *_cache_qemu_opts(cached), *CLOCK_ARGS, *vng_args,
        "--exec", f"sh {script}",
    ]
    env = dict(os.environ)
    # vng calls virtme-run by name: keep its directory on PATH
    env["PATH"] = f"{Path(vng).parent}:{Path(sys.executable).parent}:{env.get('PATH', '')}"
    console_path = shared / "console.log"
    t0 = time.monotonic()
    boot_s = guest_end = None
    timed_out = False
    killed_by = ""
    with open(console_path, "wb") as console:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
            env=env, cwd=str(REPO), start_new_session=True,
        )
        try:
            while True:
                try:
                    proc.wait(timeout=0.25)
                    break
                except subprocess.TimeoutExpired:
                    pass
                now = time.monotonic()
                if boot_s is None and (shared / "started").exists():
                    boot_s = now - t0
                if guest_end is None and (shared / "rc").exists():
                    guest_end = now
                if now - t0 > timeout:
                    timed_out = True
                    _kill_group(proc)
                    break
                why = watchdog(shared, now - t0) if watchdog is not None else None
                if why:
                    timed_out, killed_by = True, why
                    _kill_group(proc)
                    break
        finally:
            if proc.poll() is None:
                _kill_group(proc)
    total = time.monotonic() - t0
    guest_s = None
    if boot_s is not None:
        guest_s = ((guest_end or (t0 + total)) - t0) - boot_s

    def read(name: str) -> str:
        p = shared / name
        return p.read_text(errors="replace") if p.exists() else ""

    rc_text = read("rc").strip()
    counts, cases = _parse_junit(shared / "junit.xml")
    res = LaneResult(
        module=str(module.relative_to(REPO) if module.is_relative_to(REPO) else module),
        kernel=kernel, command=cmd, vng_rc=proc.returncode,
        pytest_rc=int(rc_text) if rc_text.isdigit() else None,
        timed_out=timed_out, boot_seconds=boot_s, guest_seconds=guest_s,
        total_seconds=total, guest_uname=read("uname").strip(),
        pytest_log=read("pytest.log"), console=read("console.log"),
        counts=counts, cases=cases, shared_dir=str(shared), killed_by=killed_by,
        cached=", ".join(read("mounts").split()) + (
            f" (mount errors: {read('mounts.err').strip()})" if read("mounts.err").strip() else ""),
    )
    if keep is None:
        keep = not res.passed
    if not keep:
        shutil.rmtree(shared, ignore_errors=True)
        res.shared_dir += " (removed)"
    return res


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop vng and its qemu: they run in their own session/process group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("module", help="guest pytest module, e.g. tests/kernel_lane/guest_vlan.py")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    ap.add_argument("--kernel", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the shared dir")
    ap.epilog = "extra pytest arguments go after --, e.g. -- -k qinq --durations=5"
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    a = ap.parse_args(argv)
    try:
        res = run_module(a.module, timeout=a.timeout, pytest_args=extra, kernel=a.kernel,
                         keep=a.keep or None)
    except LaneUnavailable as e:
        print(f"kernel lane unavailable: {e}", file=sys.stderr)
        return 3
    print(res.report())
    print("PASSED" if res.passed else "FAILED")
    return 0 if res.passed else 1


if __name__ == "__main__":
    sys.exit(main())
