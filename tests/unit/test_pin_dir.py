"""Pin directories are root's 0700, and one someone else could have planted is refused.

Run in a temporary directory (``top`` stands in for the BPF filesystem's
root, which is 1777 on this host); ownership checks need root to chown.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from offloader.bpfobj import make_pin_dir
from offloader.errors import BpfError
from tests.conftest import need_root


@pytest.fixture
def bpffs(tmp_path: Path) -> Path:
    need_root()
    root = tmp_path / "bpffs"
    root.mkdir()
    root.chmod(0o1777)  # like this host's /sys/fs/bpf
    return root


def mode(p: Path) -> int:
    return p.lstat().st_mode & 0o7777


def test_created_root_only(bpffs: Path) -> None:
    pins = bpffs / "ebpf-offloader" / "netns-1"
    os.umask(old := os.umask(0))  # the most permissive umask: the mode must not follow it
    try:
        make_pin_dir(pins, top=bpffs / "ebpf-offloader")
    finally:
        os.umask(old)
    for d in (pins, pins.parent):
        assert (mode(d), d.lstat().st_uid) == (0o700, 0)
    make_pin_dir(pins, top=bpffs / "ebpf-offloader")  # again: accepted as it is


def test_planted_by_another_user_is_refused(bpffs: Path) -> None:
    planted = bpffs / "ebpf-offloader"
    planted.mkdir(mode=0o700)
    os.chown(planted, 65534, 65534)
    with pytest.raises(BpfError, match=f"pin directory {planted} is a directory owned by uid "
                                       "65534 with mode 0700, not root's 0700"):
        make_pin_dir(planted / "netns-1", top=planted)
    assert not (planted / "netns-1").exists()


def test_writable_by_others_is_refused(bpffs: Path) -> None:
    loose = bpffs / "ebpf-offloader"
    loose.mkdir()
    loose.chmod(0o777)
    with pytest.raises(BpfError, match="mode 0777"):
        make_pin_dir(loose, top=loose)


def test_symlink_is_refused(bpffs: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (bpffs / "ebpf-offloader").symlink_to(elsewhere)
    with pytest.raises(BpfError, match="not a directory"):
        make_pin_dir(bpffs / "ebpf-offloader", top=bpffs / "ebpf-offloader")


def test_older_versions_directory_is_tightened(bpffs: Path) -> None:
    old = bpffs / "ebpf-offloader"
    old.mkdir()
    old.chmod(0o755)  # what earlier versions created; only root could write in it
    make_pin_dir(old / "netns-7", top=old)
    assert mode(old) == 0o700 and mode(old / "netns-7") == 0o700
