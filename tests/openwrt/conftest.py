"""Fixtures for the OpenWrt package tests (helpers live in owrt_sandbox.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .owrt_sandbox import SHELLS, Sandbox


@pytest.fixture(params=SHELLS, ids=[s[0] for s in SHELLS])
def sandbox(request: pytest.FixtureRequest, tmp_path: Path) -> Sandbox:
    return Sandbox(tmp_path, request.param)
