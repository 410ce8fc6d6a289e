"""Shared test setup: the BPF object, and the CI rule that skips are failures."""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
OBJECT = ROOT / "build" / "offload.bpf.o"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _skip_reason(longrepr: Any) -> str:
    # A skip's longrepr is (path, lineno, "Skipped: why").
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _fail_if_skipped_in_ci(report: pytest.TestReport | pytest.CollectReport) -> None:
    # With CI=true a skipped test is a failure: tests that need root, BPF or
    # namespaces must run there, never vanish silently. The report is changed
    # before anyone has seen it, so pytest counts and summarises a failure.
    # xfail reports (skipped with ``wasxfail``) keep their outcome.
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true: {_skip_reason(report.longrepr)}"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
        item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport,
                                                                     pytest.TestReport]:
    report = yield
    _fail_if_skipped_in_ci(report)
    return report


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_make_collect_report(
        collector: pytest.Collector) -> Generator[None, pytest.CollectReport,
                                                  pytest.CollectReport]:
    # A module-level skip (pytest.skip(allow_module_level=True), importorskip)
    # would hide every test in the module.
    report = yield
    _fail_if_skipped_in_ci(report)
    return report


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (BPF, network namespaces)")


@pytest.fixture(scope="session")
def bpf_object() -> Path:
    """Path of the built datapath object (build it first: cmake)."""
    need_root()
    if not OBJECT.is_file():
        pytest.fail(f"{OBJECT} missing: run cmake -S . -B build && cmake --build build")
    return OBJECT


# -- the order of the session, and when the second-kernel lane boots ---------------------
# The lane's guests (tests/kernel_lane, qemu under software emulation) keep about one
# CPU each busy for 10-13 minutes, on a 2-CPU machine. Run beside the integration tests
# (agents in namespaces, real conntrack timeouts, transfers polled with bounds) they
# made those fail; run after everything they add their whole time to the suite. So the
# integration tests run first, alone; the guests boot as soon as the first test after
# them starts, and run beside the datapath, openwrt and unit tests, which wait on
# nothing; the lane's own tests, which only collect the guests' results, come last.
def _phase(item: pytest.Item) -> int:
    parts = Path(str(item.path)).parts
    return 0 if "integration" in parts else 2 if "kernel_lane" in parts else 1


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    items.sort(key=_phase)  # stable: each module keeps its own order


_LANE_KICKED: list[bool] = []


def pytest_runtest_setup(item: pytest.Item) -> None:
    if _phase(item) > 0 and not _LANE_KICKED:
        _LANE_KICKED.append(True)
        from tests.kernel_lane.test_lane import start_early

        start_early(item.session)


def pytest_sessionfinish(session: pytest.Session) -> None:
    from tests.kernel_lane.test_lane import stop_early

    stop_early()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    # The lane's guests time their own tests (--durations in the guest pytest), but a
    # passed test's output is not shown (CI runs `pytest -q`): the boots' times and
    # each guest's slowest tests go to the end of the report, whatever the verbosity.
    from tests.kernel_lane.test_lane import lane_summary

    lines = lane_summary()
    if lines:
        terminalreporter.write_sep("=", "kernel lane: boots and the guests' slowest tests")
        for line in lines:
            terminalreporter.write_line(line)
