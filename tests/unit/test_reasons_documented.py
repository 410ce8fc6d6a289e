"""The tables in docs/design.md name exactly the decision enums' members:
a new reason cannot be counted under a name the docs do not explain."""

from __future__ import annotations

import enum
import re
from pathlib import Path

import pytest

from offloader.decision import DropReason, PassReason, Teardown

DESIGN = Path(__file__).resolve().parents[2] / "docs" / "design.md"


def table_values(heading: str) -> set[str]:
    text = DESIGN.read_text()
    start = text.index(heading)
    rows = []
    for line in text[start:].splitlines()[1:]:
        if line.startswith("#"):
            break
        m = re.match(r"\| `([^`]+)` \|", line)
        if m:
            rows.append(m.group(1))
        elif rows and not line.startswith("|"):
            break
    return set(rows)


@pytest.mark.parametrize("members, heading", [
    (PassReason, "Why a connection stays with the kernel for good"),
    (Teardown, "Why offloaded flows went back to the kernel"),
    (DropReason, "Why the datapath drops a tuple early"),
])
def test_every_member_has_its_row(members: type[enum.StrEnum], heading: str) -> None:
    assert table_values(heading) == {str(m) for m in members}
