"""The layout stamp list in bpf/offload.h must name every field."""

from __future__ import annotations

from pathlib import Path

import pytest

from offloader.errors import OffloadError
from offloader.layout import Layout, header_path, layout, stamp_name


def test_the_stamp_covers_every_struct() -> None:
    lay = layout()
    assert lay.stamp_table[0] == lay.const("OFL_LAYOUT_VERSION")
    # Per struct one size and two numbers per field; ofl_key alone has 12 fields.
    assert len(lay.stamp_table) > 1 + 7 + 2 * 12
    assert lay.stamp == stamp_name(lay.stamp_table)


def test_a_field_missing_from_the_list_is_an_error(tmp_path: Path) -> None:
    text = header_path().read_text()
    broken = tmp_path / "offload.h"
    broken.write_text(text.replace(" F(ofl_flow, seen)", ""))
    with pytest.raises(OffloadError, match="struct ofl_flow"):
        Layout(broken)
