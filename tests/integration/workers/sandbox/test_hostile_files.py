"""The sandbox work dir as its own capped tmpfs: mounted, full at its cap, unmounted and reaped.

These mount (``mount``/``umount2`` through ctypes, as the worker does as root), so they are not unit
tests; the hardened reader itself is tested in tests/unit/workers/sandbox/test_hostile_files.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from workers.sandbox.hostile_files import capped_work_dir, remove_work_dir


def test_a_capped_work_dir_is_a_tmpfs_that_ends_in_enospc_and_leaves_nothing(tmp_path: Path) -> None:
    work = tmp_path / "work"
    with capped_work_dir(work, 1 << 20) as capped:
        assert capped is (os.geteuid() == 0)
        if not capped:
            pytest.fail("the worker runs as root here: the work dir must be a capped tmpfs")
        assert os.path.ismount(work)
        assert oct(os.stat(work).st_mode & 0o7777) == oct(0o1770)
        written = 0
        with pytest.raises(OSError) as caught, open(work / "fill", "wb") as handle:
            for _ in range(4):
                handle.write(b"x" * (1 << 19))
                handle.flush()
                written += 1 << 19
        assert caught.value.errno == 28  # ENOSPC
        assert written <= 1 << 20
    assert not os.path.ismount(work)
    assert list(work.iterdir()) == []
    remove_work_dir(work)
    assert not work.exists()


def test_a_folder_that_is_already_a_mount_is_reused_and_left_mounted(tmp_path: Path) -> None:
    work = tmp_path / "work"
    with capped_work_dir(work, 1 << 20):
        (work / "gateway.sock").write_bytes(b"")
        with capped_work_dir(work, 1 << 20) as inner:
            assert inner is True and (work / "gateway.sock").exists()
        assert os.path.ismount(work) and (work / "gateway.sock").exists()
    assert not os.path.ismount(work)


def test_work_dirs_older_than_any_run_are_reaped_live_ones_are_kept(tmp_path: Path) -> None:
    from workers.sandbox.hostile_files import mount_tmpfs, reap_work_dirs

    parent = tmp_path / "sandboxes"
    stale, live, plain = parent / "stale", parent / "live", parent / "plain-stale"
    for folder in (stale, live, plain):
        folder.mkdir(parents=True)
    (parent / ".process-pids").mkdir()
    mount_tmpfs(stale, 1 << 20)
    mount_tmpfs(live, 1 << 20)
    (plain / "left").write_bytes(b"x")
    old = 1_000_000_000.0
    os.utime(stale, (old, old))
    os.utime(plain, (old, old))
    try:
        assert reap_work_dirs(parent, 3600) == 2
        assert not stale.exists() and not plain.exists()
        assert os.path.ismount(live) and (parent / ".process-pids").is_dir()
    finally:
        remove_work_dir(live)
    assert reap_work_dirs(tmp_path / "missing", 1) == 0
