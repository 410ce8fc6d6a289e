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
