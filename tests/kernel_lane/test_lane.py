"""Host side of the second-kernel lane: one test per guest module, each boots Debian's
6.1 kernel under qemu (virtme-ng, no KVM) and runs that module inside (lane.py).

The boots run two at a time (each guest keeps about one host CPU busy, the machine
has two), in BOOT_ORDER: the three short modules first, then the two halves of the
agent-offload cases (guest_offload_vlan, guest_offload_qinq_pppoe, about the same
time each), one in each slot, so both slots end at about the same time. The boots
start in the background when the first test after the integration tests starts
(tests/conftest.py orders the session: integration, then the rest, this directory
last), so the short modules run beside the datapath, openwrt and unit tests; each
test_guest_module waits for its own module's result and reports it.

Without the 6.1 kernel / vng / qemu: skip with the setup command, except in CI
(CI=true), where a skip would hide a broken lane, so it fails.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time

import pytest

from .lane import HERE, LaneResult, LaneUnavailable, run_module, unavailable_reason

pytestmark = pytest.mark.kernel_lane

OFFLOAD_HALVES = ["guest_offload_qinq_pppoe.py", "guest_offload_vlan.py"]
GUEST_MODULES = ["guest_vlan.py", "guest_pppoe.py", "guest_bpf.py", *OFFLOAD_HALVES]
# Boot order, BOOT_JOBS guests at once: guest_pppoe (the longest short one) beside
# guest_vlan, guest_bpf in the slot that frees first (guest_vlan's); the first
# offload half in the slot that frees next, the second in the last one. The short
# modules take about as long in each slot (pppoe ~ vlan + bpf), so the two halves
# start close together and, being about as long, end close together: the lane is
# about the short modules' slot plus one half, where it was one slot plus the
# whole guest_offload.py, the other slot idle (docs/kernel-lane.md, times).
BOOT_ORDER = ["guest_pppoe.py", "guest_vlan.py", "guest_bpf.py", *OFFLOAD_HALVES]
BOOT_JOBS = int(os.environ.get("KERNEL_LANE_JOBS", "2"))
# Per-boot timeouts (boot + module), about twice the time measured on a busy host;
# KERNEL_LANE_TIMEOUT overrides them all. The lane as a whole never takes longer than
# KERNEL_LANE_BUDGET (default 18 min): a module gets at most what is left.
# The short modules share the CPUs two at a time: on a busy host (load 3,
# 2026-12-01) guest_vlan took 73 s, guest_pppoe 216 s and guest_bpf 131 s one after
# the other; two at a time at load 6-9 (other engineers' tests) guest_vlan took
# 231 s, guest_pppoe 453 s and guest_bpf 361 s. The agent-offload cases, one
# guest_offload.py until 2026-12-02 (9 agent starts under emulation), took 551 s in
# CI and 953 s at load 6-9; each half has 4-5 of those starts and runs beside the
# other half: 720 s each. A timeout is for a hung guest; the lane's budget bounds
# the rest.
MODULE_TIMEOUTS = {"guest_vlan.py": 480.0, "guest_pppoe.py": 600.0, "guest_bpf.py": 480.0,
                   "guest_offload_vlan.py": 720.0, "guest_offload_qinq_pppoe.py": 720.0}
TIMEOUT_OVERRIDE = os.environ.get("KERNEL_LANE_TIMEOUT")
LANE_BUDGET = float(os.environ.get("KERNEL_LANE_BUDGET", "1080"))
_LANE_START: list[float] = []


def module_timeout(module: str, now: float | None = None) -> float:
    """The timeout for one boot: its own (or the override), capped by what is left of
    the lane's budget (counted from the first boot of this session)."""
    now = time.monotonic() if now is None else now
    if not _LANE_START:
        _LANE_START.append(now)
    own = float(TIMEOUT_OVERRIDE) if TIMEOUT_OVERRIDE else MODULE_TIMEOUTS.get(module, 240.0)
    return min(own, LANE_BUDGET - (now - _LANE_START[0]))


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.fixture(scope="session")
def lane_ready():
    why = unavailable_reason()
    if why:
        msg = f"second-kernel lane unavailable: {why}"
        if _in_ci():
            pytest.fail(msg + " (CI=true: a skipped lane counts as a failure)", pytrace=False)
        pytest.skip(msg)


class Boots:
    """The selected modules' boots in BOOT_ORDER, `jobs` at a time, in a background
    thread; result(module) waits for one of them. A boot
    whose budget is gone (< 60 s left when its turn comes) does not start: its
    result is the message saying so."""

    def __init__(self, modules: list[str], jobs: int = BOOT_JOBS,
                 run=run_module) -> None:
        self.modules = modules
        self.jobs = max(1, jobs)
        self.run = run
        self.done: dict[str, concurrent.futures.Future] = {
            m: concurrent.futures.Future() for m in modules}
        self.wall: dict[str, float] = {}
        self.t0 = time.monotonic()
        self.began: dict[str, float] = {}  # module -> its boot's start, s after t0
        self.stopping = threading.Event()  # set: running guests are stopped, no new boot
        self.thread = threading.Thread(target=self._run_all, name="kernel-lane", daemon=True)
        self.thread.start()

    def _one(self, module: str) -> None:
        fut = self.done[module]
        t0 = time.monotonic()
        self.began[module] = t0 - self.t0
        try:
            timeout = module_timeout(module, t0)
            if timeout < 60:
                fut.set_result(f"lane budget ({LANE_BUDGET:.0f}s) exhausted before {module}")
                return
            if self.stopping.is_set():
                fut.set_result(f"lane stopped before {module} booted")
                return
            fut.set_result(self.run(HERE / module, timeout=timeout, watchdog=self._watchdog))
        except BaseException as e:  # LaneUnavailable (raced with the fixture), a bug
            fut.set_exception(e)
        finally:
            self.wall[module] = time.monotonic() - t0

    def _watchdog(self, shared, elapsed) -> str | None:
        return "the host's pytest ended first" if self.stopping.is_set() else None

    def stop(self, wait: float = 30.0) -> None:
        """Stops running guests (vng's process group; the runner's watchdog) and
        starts no more: at the end of the session, also after a Ctrl-C."""
        self.stopping.set()
        self.thread.join(timeout=wait)

    def _run_all(self) -> None:
        mods = [m for m in BOOT_ORDER if m in self.done]
        with concurrent.futures.ThreadPoolExecutor(self.jobs) as pool:
            list(pool.map(self._one, mods))  # a pool's queue starts them in order
        for fut in self.done.values():  # a module not in BOOT_ORDER: never left waiting
            if not fut.done():
                fut.set_result("module is not in BOOT_ORDER")

    def result(self, module: str) -> LaneResult | str:
        # every boot is bounded by its timeout, the lane by its budget
        return self.done[module].result(timeout=LANE_BUDGET + 120 * len(self.modules))


def selected_modules(items) -> list[str]:
    """The guest modules whose test_guest_module is among a session's items."""
    selected = [it.callspec.params["module"] for it in items
                if getattr(it, "originalname", "") == "test_guest_module"
                and hasattr(it, "callspec")]
    return [m for m in GUEST_MODULES if m in selected]


# The boots started at the end of collection (conftest.py), for the `boots` fixture.
_EARLY: list[Boots] = []


def start_early(session, run=run_module) -> None:
    """Called once, when the first test after the integration tests starts
    (tests/conftest.py): starts the selected modules' boots at once, so the guests
    run beside the datapath, openwrt and unit tests instead of after them. Nothing
    starts when no lane test is selected, for --collect-only, or when the lane
    cannot run (the `lane_ready` fixture then skips or fails the tests, as before)."""
    if _EARLY or session.config.option.collectonly:
        return
    modules = selected_modules(session.items)
    if modules and unavailable_reason() is None:
        _EARLY.append(Boots(modules, run=run))


def stop_early() -> None:
    """At the end of the session: stops the early boots if no test took them
    (the session was cut short, -x, Ctrl-C)."""
    while _EARLY:
        _EARLY.pop().stop()


@pytest.fixture(scope="session")
def boots(request, lane_ready):
    """The boots of the modules this session selected, all in the background: those
    started at the end of collection, or started now (a session that collected this
    module without the conftest hook having run, e.g. a plugin's own collection)."""
    b = _EARLY.pop() if _EARLY else Boots(selected_modules(request.session.items))
    yield b
    b.stop()  # nothing left running by then, unless the session was cut short


def test_guest_modules_listed():
    """Every guest_*.py in this directory has a lane test (so none is forgotten) and
    a place in the boot order."""
    found = sorted(p.name for p in HERE.glob("guest_*.py"))
    assert found == sorted(GUEST_MODULES), found
    assert sorted(BOOT_ORDER) == sorted(GUEST_MODULES), BOOT_ORDER


@pytest.mark.parametrize("module", GUEST_MODULES)
def test_guest_module(boots, module):
    try:
        res = boots.result(module)
    except LaneUnavailable as e:  # raced with the fixture's check
        pytest.fail(str(e), pytrace=False)
    if isinstance(res, str):
        pytest.fail(res, pytrace=False)
    print(res.report())
    print(f"lane wall time for {module}: {boots.wall.get(module, 0.0):.1f}s")
    _SUMMARY.append((module, boots.began.get(module), boots.wall.get(module), res))
    assert res.passed, "\n" + res.report()


# (module, its boot's start after the lane's, wall, result), for lane_summary()
_SUMMARY: list[tuple[str, float | None, float | None, LaneResult]] = []


def lane_summary() -> list[str]:
    """What the session's boots took, for the end of the host's report (conftest.py
    prints it; `pytest -q` shows no output of passed tests): each module's start and
    end on the lane's clock, its boot and test times, and the guest pytest's own
    slowest tests, which are what the boots are balanced by (BOOT_ORDER, the two
    offload halves)."""
    out = []
    for module, began, wall, res in sorted(_SUMMARY, key=lambda r: r[1] or 0.0):
        span = ("?" if began is None or wall is None
                else f"{began:.0f}-{began + wall:.0f}s")
        out.append(f"{module}: {'passed' if res.passed else 'FAILED'}, lane {span}, "
                   f"boot {_fmt_s(res.boot_seconds)}, tests {_fmt_s(res.guest_seconds)}, "
                   f"{res.counts.get('tests', 0)} tests")
        out += [f"    {line}" for line in res.durations()[:15]]
    return out


def _fmt_s(s: float | None) -> str:
    return "?" if s is None else f"{s:.0f}s"


# --- the runner's own logic, no boot needed -----------------------------------------


def _result(**kw):
    from .lane import LaneResult

    base = dict(module="m", kernel="k", command=["vng"], vng_rc=0, pytest_rc=0,
                timed_out=False, boot_seconds=1.0, guest_seconds=1.0, total_seconds=2.0,
                guest_uname="6.1.0-56-amd64", pytest_log="", console="",
                counts={"tests": 2, "failures": 0, "errors": 0, "skipped": 0}, cases=[],
                shared_dir="/tmp/x")
    base.update(kw)
    return LaneResult(**base)


def test_lane_budget_bounds_the_worst_case():
    """Every module timing out still ends the lane within the budget (< 20 min)."""
    assert set(MODULE_TIMEOUTS) == set(GUEST_MODULES)
    assert LANE_BUDGET < 20 * 60
    start = 1000.0
    _LANE_START[:] = []
    used = 0.0
    for m in GUEST_MODULES:
        t = module_timeout(m, start + used)
        if t < 60:
            break
        used += t + 10  # a killed boot takes a few seconds more to reap
    assert used <= LANE_BUDGET + 10 * len(GUEST_MODULES)
    _LANE_START[:] = []


def test_result_passed_only_when_clean():
    assert _result().passed
    assert not _result(pytest_rc=1).passed
    assert not _result(pytest_rc=None).passed
    assert not _result(timed_out=True).passed
    assert not _result(counts={"tests": 0, "failures": 0, "errors": 0, "skipped": 0}).passed
    assert not _result(counts={"tests": 2, "failures": 0, "errors": 0, "skipped": 1}).passed
    assert not _result(counts={"tests": 2, "failures": 1, "errors": 0, "skipped": 0}).passed
    rep = _result(pytest_rc=1, pytest_log="E boom", console="kernel panic").report()
    assert "E boom" in rep and "kernel panic" in rep


def test_guest_durations_reach_the_host_summary():
    """The guest's --durations table comes out of its log, and lane_summary() puts
    it under the module's line (what conftest.py prints at the end of the session)."""
    log = ("tests/kernel_lane/guest_x.py::test_a PASSED\n"
           "============================= slowest 15 durations =============================\n"
           "61.20s call     tests/kernel_lane/guest_x.py::test_a\n"
           "3.10s setup    tests/kernel_lane/guest_x.py::test_a\n"
           "\n(2 durations < 0.005s hidden.  Use -vv to show these durations.)\n"
           "=========================== short test summary info ============================\n"
           "PASSED tests/kernel_lane/guest_x.py::test_a\n")
    res = _result(module="guest_x.py", pytest_log=log, boot_seconds=21.0, guest_seconds=70.0)
    assert res.durations() == ["61.20s call     tests/kernel_lane/guest_x.py::test_a",
                               "3.10s setup    tests/kernel_lane/guest_x.py::test_a"]
    assert _result(pytest_log="no table here").durations() == []
    saved = _SUMMARY[:]
    _SUMMARY[:] = [("guest_x.py", 100.0, 95.0, res), ("guest_y.py", 0.0, 99.0, _result())]
    try:
        lines = lane_summary()
    finally:
        _SUMMARY[:] = saved
    assert lines[0].startswith("guest_y.py: passed, lane 0-99s")
    assert lines[1] == "guest_x.py: passed, lane 100-195s, boot 21s, tests 70s, 2 tests"
    assert lines[2] == "    61.20s call     tests/kernel_lane/guest_x.py::test_a"
    assert len(lines) == 4


def test_parse_junit(tmp_path):
    from .lane import _parse_junit

    (tmp_path / "j.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="g" name="a"/>'
        '<testcase classname="g" name="b"><failure message="x"/></testcase>'
        '<testcase classname="g" name="c"><skipped message="y"/></testcase>'
        "</testsuite></testsuites>")
    counts, cases = _parse_junit(tmp_path / "j.xml")
    assert counts == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1}
    assert cases == [("g::a", "passed"), ("g::b", "FAILED"), ("g::c", "SKIPPED")]
    assert _parse_junit(tmp_path / "missing.xml")[0]["tests"] == 0
    (tmp_path / "bad.xml").write_text("<testsuite")
    assert _parse_junit(tmp_path / "bad.xml")[0]["tests"] == 0


def test_guest_script_uses_host_python_and_shared_dir(tmp_path):
    import sys

    from .lane import _guest_script

    script = _guest_script(HERE / "guest_vlan.py", tmp_path, ["-k", "qinq"])
    assert f"{sys.executable} -m pytest" in script
    assert f"--junitxml={tmp_path}/junit.xml" in script
    assert f"> {tmp_path}/pytest.log" in script and f"> {tmp_path}/rc" in script
    assert "KERNEL_LANE_GUEST=1" in script and "--noconftest" in script
    assert "-k qinq" in script
    assert "mount -t 9p" not in script
    cached = _guest_script(HERE / "guest_vlan.py", tmp_path, [], ["/usr", "/opt/py"])
    assert ("mount -t 9p -o ro,trans=virtio,version=9p2000.L,cache=loose,msize=524288 "
            "klc1 /opt/py") in cached
    # the mounts come before anything runs from them
    assert cached.index("klc0 /usr") < cached.index(f"{sys.executable} -m pytest")


def test_cached_dirs_and_their_qemu_options(monkeypatch):
    """The userland, the interpreter's prefix and the repo, each once (a directory
    inside another is covered by it), never /; KERNEL_LANE_9P_CACHE=0 turns it off."""
    import sys

    from . import lane

    dirs = lane.cached_dirs()
    assert "/usr" in dirs and "/" not in dirs
    assert os.path.realpath(lane.REPO) in dirs or any(
        os.path.realpath(lane.REPO).startswith(d + "/") for d in dirs)
    assert any(os.path.realpath(sys.base_prefix) == d
               or os.path.realpath(sys.base_prefix).startswith(d + "/") for d in dirs)
    for a in dirs:
        assert not any(b != a and a.startswith(b + "/") for b in dirs), dirs
    (opts,) = lane._cache_qemu_opts(["/usr", "/opt/py"])
    assert opts == ("--qemu-opts=-fsdev local,id=klc0,path=/usr,security_model=none,"
                    "readonly=on,multidevs=remap -device virtio-9p-pci,fsdev=klc0,mount_tag=klc0"
                    " -fsdev local,id=klc1,path=/opt/py,security_model=none,readonly=on,"
                    "multidevs=remap -device virtio-9p-pci,fsdev=klc1,mount_tag=klc1")
    assert lane._cache_qemu_opts([]) == []
    monkeypatch.setenv("KERNEL_LANE_9P_CACHE", "0")
    assert lane.cached_dirs() == []


def test_parse_frame_tags_and_pppoe():
    from .topology import TP_STATUS_VLAN_TPID_VALID, TP_STATUS_VLAN_VALID, parse_frame

    dst, src = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
    ip4 = bytes([0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0, 198, 18, 1, 2, 198, 18, 2, 2])
    # QinQ in-band: 88a8 vid 100, 8100 vid 7, IPv4/TCP
    f = parse_frame(dst + src + bytes.fromhex("88a80064810000070800") + ip4, None, True)
    assert f.tags == ((0x88A8, 100), (0x8100, 7)) and f.ethertype == 0x0800
    assert (f.ip_src, f.ip_dst, f.ip_proto, f.outgoing) == ("198.18.1.2", "198.18.2.2", 6, True)
    # outer tag in skb metadata (PACKET_AUXDATA), inner in-band
    aux = (TP_STATUS_VLAN_VALID | TP_STATUS_VLAN_TPID_VALID, 0, 0, 0, 0, 100, 0x88A8)
    f = parse_frame(dst + src + bytes.fromhex("810000070800") + ip4, aux, False)
    assert f.tags == ((0x88A8, 100), (0x8100, 7)) and f.ip_proto == 6
    # PPPoE session 0x1234, PPP IPv4
    f = parse_frame(dst + src + bytes.fromhex("8864" "1100" "1234" "002a" "0021") + ip4,
                    None, False)
    assert (f.ethertype, f.pppoe_session, f.ppp_proto, f.ip_src) == (
        0x8864, 0x1234, 0x0021, "198.18.1.2")
    assert parse_frame(b"short", None, False) is None


def test_boots_order_and_concurrency():
    """Boots start in BOOT_ORDER, two at a time: guest_pppoe beside guest_vlan,
    guest_bpf once one of them has ended, the first offload half once two of the
    short modules have ended, the second once all three have (so the halves run
    beside each other, not beside a short one); every result reaches its module."""
    events: list[tuple[str, str]] = []
    running: set[str] = set()
    most = [0]
    lock = threading.Lock()
    release = threading.Event()
    shorts_ended = threading.Semaphore(0)

    def fake_run(path, timeout, watchdog):
        name = path.name
        with lock:
            events.append(("start", name))
            running.add(name)
            most[0] = max(most[0], len(running))
            if len(running) == 2:
                release.set()
        release.wait(timeout=10)  # the first two wait for each other: they overlap
        if name == OFFLOAD_HALVES[0]:
            # as on a real host, the first half outlasts the short module still
            # running beside it; without this hold the fake boots return at once,
            # and the thread running guest_pppoe may not have been scheduled yet
            # when the other slot has run bpf and the first half (a flaky failure)
            for _ in range(3):
                assert shorts_ended.acquire(timeout=10), events
        with lock:
            running.discard(name)
            events.append(("end", name))
        if name in ("guest_pppoe.py", "guest_vlan.py", "guest_bpf.py"):
            shorts_ended.release()
        return _result(module=name)

    _LANE_START[:] = []
    try:
        b = Boots(list(GUEST_MODULES), jobs=2, run=fake_run)
        results = {m: b.result(m) for m in GUEST_MODULES}
        b.thread.join(timeout=10)
    finally:
        _LANE_START[:] = []
    assert {m: r.module for m, r in results.items()} == {m: m for m in GUEST_MODULES}
    assert most[0] == 2, events
    starts = [n for e, n in events if e == "start"]
    assert starts == BOOT_ORDER, events
    shorts = ("guest_pppoe.py", "guest_vlan.py", "guest_bpf.py")
    for half, ended in zip(OFFLOAD_HALVES, (2, 3), strict=True):
        at = events.index(("start", half))
        assert sum(1 for m in shorts if events.index(("end", m)) < at) >= ended, events


def test_boots_budget_gone_and_unavailable():
    """A boot with less than 60 s of budget left does not start and says why; a
    runner exception reaches that module's test."""

    def fake_run(path, timeout, watchdog):
        raise LaneUnavailable("no vng")

    _LANE_START[:] = [time.monotonic() - LANE_BUDGET]  # the budget is spent
    try:
        b = Boots(["guest_vlan.py"], run=fake_run)
        assert "exhausted before guest_vlan.py" in b.result("guest_vlan.py")
    finally:
        _LANE_START[:] = []
    try:
        b = Boots(["guest_bpf.py"], run=fake_run)
        with pytest.raises(LaneUnavailable):
            b.result("guest_bpf.py")
    finally:
        _LANE_START[:] = []


def test_boots_stop_ends_running_guests():
    """stop(): the runner's watchdog of a running guest answers with a reason (so
    run_module kills it), and a boot not yet started never starts."""
    seen: list[str | None] = []
    started: list[str] = []
    first = threading.Event()

    def fake_run(path, timeout, watchdog):
        started.append(path.name)
        first.set()
        for _ in range(200):  # bounded: as run_module polls its watchdog
            why = watchdog(None, 0.0)
            if why:
                seen.append(why)
                break
            time.sleep(0.05)
        return _result(module=path.name, timed_out=bool(seen))

    _LANE_START[:] = []
    try:
        b = Boots(["guest_vlan.py", "guest_offload_vlan.py"], jobs=1, run=fake_run)
        assert first.wait(timeout=10)
        b.stop()
        assert not b.thread.is_alive()
        assert not b.result("guest_vlan.py").passed
        assert "stopped before guest_offload_vlan.py" in b.result("guest_offload_vlan.py")
    finally:
        _LANE_START[:] = []
    assert started == ["guest_vlan.py"] and seen == ["the host's pytest ended first"]


def test_start_early_boots_only_what_the_session_runs(monkeypatch):
    """The end of collection starts the selected modules' boots (the `boots` fixture
    takes them); nothing for --collect-only, a session without lane tests, or a lane
    that cannot run."""
    import types

    def item(module):
        return types.SimpleNamespace(originalname="test_guest_module",
                                     callspec=types.SimpleNamespace(params={"module": module}))

    def session(items, collectonly=False):
        option = types.SimpleNamespace(collectonly=collectonly)
        return types.SimpleNamespace(items=items, config=types.SimpleNamespace(option=option))

    ran: list[str] = []

    def fake_run(path, timeout, watchdog):
        ran.append(path.name)
        return _result(module=path.name)

    monkeypatch.setattr(f"{__name__}.unavailable_reason", lambda: None)
    _LANE_START[:] = []
    saved = _EARLY[:]  # the session's own, if a test has not taken them yet
    _EARLY.clear()
    try:
        start_early(session([item("guest_bpf.py")], collectonly=True), run=fake_run)
        start_early(session([types.SimpleNamespace(originalname="test_parse_junit")]),
                    run=fake_run)
        assert not _EARLY
        start_early(session([item("guest_bpf.py"), item("guest_vlan.py")]), run=fake_run)
        assert len(_EARLY) == 1 and _EARLY[0].modules == ["guest_vlan.py", "guest_bpf.py"]
        assert _EARLY[0].result("guest_bpf.py").module == "guest_bpf.py"
        stop_early()
        assert not _EARLY and sorted(ran) == ["guest_bpf.py", "guest_vlan.py"]
        monkeypatch.setattr(f"{__name__}.unavailable_reason", lambda: "no vng")
        start_early(session([item("guest_bpf.py")]), run=fake_run)
        assert not _EARLY
    finally:
        stop_early()
        _EARLY[:] = saved
        _LANE_START[:] = []
