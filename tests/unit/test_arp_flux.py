"""Whether a macvlan's lower device answers ARP for the macvlan's addresses
(then TC on the macvlan misses the frames peers send to the lower device).

FAKES: a directory shaped like /proc/sys/net/ipv4/conf; the end-to-end
case is tests/integration/test_offload.py (the macvlan WAN download)."""

from __future__ import annotations

from pathlib import Path

import pytest

from offloader.attach import answers_arp_for_others


def conf(tmp: Path, **values: int) -> Path:
    """``all_arp_ignore=1``, ``wan0_arp_filter=1``, ...; the rest 0."""
    for scope in ("all", "wan0"):
        (tmp / scope).mkdir(exist_ok=True)
        for name in ("arp_ignore", "arp_filter"):
            (tmp / scope / name).write_text(f"{values.get(f'{scope}_{name}', 0)}\n")
    return tmp


@pytest.mark.parametrize("values, flux", [
    ({}, True),  # Linux's default
    ({"all_arp_ignore": 1}, False),  # OpenWrt's default
    ({"wan0_arp_ignore": 2}, False),
    ({"all_arp_filter": 1}, False),
    ({"wan0_arp_filter": 1}, False),
])
def test_linux_default_answers_for_others(tmp_path: Path, values: dict[str, int],
                                          flux: bool) -> None:
    assert answers_arp_for_others("wan0", conf(tmp_path, **values)) is flux


def test_unreadable_says_nothing(tmp_path: Path) -> None:
    assert answers_arp_for_others("wan0", tmp_path) is False
