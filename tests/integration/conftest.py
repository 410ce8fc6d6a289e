"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from offloader.lab import Topology, lab_network
from tests.conftest import need_root


@pytest.fixture
def lab(bpf_object: Any) -> Iterator[Topology]:
    """A fresh lab network for one test, with no agent started; removed
    afterwards, agent and all. A module that needs another setup defines its
    own ``lab``, which overrides this one."""
    need_root()
    with lab_network() as topo:
        yield topo
