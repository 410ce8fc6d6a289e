"""The datapath object loaded once per test module, its maps reset per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from offloader.datapath import Datapath

from .rig import Rig


@pytest.fixture(scope="module")
def loaded(bpf_object: Path) -> Iterator[Rig]:
    dp = Datapath(str(bpf_object), max_flows=1024)
    try:
        r = Rig(dp)
        yield r
        r.close()
    finally:
        dp.close()


@pytest.fixture
def rig(loaded: Rig) -> Rig:
    loaded.reset()
    return loaded
