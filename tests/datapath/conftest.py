"""The datapath object loaded once per test module, its maps reset per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from offloader.datapath import Datapath

from .rig import Rig


@pytest.fixture(scope="module")
def loaded(bpf_object: Path) -> Iterator[Datapath]:
    dp = Datapath(str(bpf_object), max_flows=1024)
    try:
        yield dp
    finally:
        dp.close()


@pytest.fixture
def rig(loaded: Datapath) -> Rig:
    r = Rig(loaded)
    r.reset()
    return r
