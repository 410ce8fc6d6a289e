"""Shared test setup: the BPF object, and the CI rule that skips are failures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OBJECT = ROOT / "build" / "offload.bpf.o"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # With CI=true a skipped test is a failure: tests that need root, BPF or
    # namespaces must run there, never vanish silently.
    if (os.environ.get("CI") == "true" and report.skipped and report.when in ("setup", "call")
            and not hasattr(report, "wasxfail")):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true: {report.longrepr}"


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
