"""The hardened reader of sandbox-controlled files, against files this test makes in a tmp dir.

Each hostile kind must fail fast with its code (``invalid_result`` / ``result_too_large``): a
FIFO without a writer is the case that would block a plain ``open()`` forever, so every read
runs in a thread that must finish (a hang fails the test; no wall-clock bound decides a pass).
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from workers.sandbox.hostile_files import (
    InvalidSandboxFile,
    SandboxFileTooLarge,
    capped_work_dir,
    read_sandbox_file,
)

SECRET = b"host-secret-0123456789-never-read"
CAP = 1024


def finishes(action: Callable[[], Any], timeout: float = 60) -> Any:
    """Run ``action`` in a thread; a thread still running after a generous timeout is a hang: fail."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = action()
        except BaseException as exc:  # re-raised in the test's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the reader blocked"
    if "error" in box:
        raise box["error"]
    return box.get("value")


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "host-secret"
    path.write_bytes(SECRET)
    path.chmod(0o600)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


def test_a_regular_file_is_read(folder: Path) -> None:
    (folder / "result.json").write_bytes(b'{"status": "ok"}')
    assert read_sandbox_file(folder, "result.json", CAP) == b'{"status": "ok"}'


def test_a_missing_file_is_none(folder: Path) -> None:
    assert read_sandbox_file(folder, "result.json", CAP) is None


def test_exactly_the_cap_is_read_one_more_byte_is_too_large(folder: Path) -> None:
    (folder / "result.json").write_bytes(b"x" * CAP)
    assert read_sandbox_file(folder, "result.json", CAP) == b"x" * CAP
    (folder / "result.json").write_bytes(b"x" * (CAP + 1))
    with pytest.raises(SandboxFileTooLarge) as caught:
        read_sandbox_file(folder, "result.json", CAP)
    assert caught.value.code == "result_too_large"


def _symlink(target: str) -> Callable[[Path, Path], None]:
    def make(folder: Path, secret: Path) -> None:
        os.symlink(target.replace("{secret}", str(secret)), folder / "result.json")
    return make


def _fifo(folder: Path, secret: Path) -> None:
    os.mkfifo(folder / "result.json")


def _directory(folder: Path, secret: Path) -> None:
    (folder / "result.json").mkdir()


def _socket(folder: Path, secret: Path) -> None:
    os.mknod(folder / "result.json", 0o600 | stat.S_IFSOCK)  # the inode a bound unix socket leaves, without binding


def _hard_link_to_secret(folder: Path, secret: Path) -> None:
    os.link(secret, folder / "result.json")


def _hard_link_inside(folder: Path, secret: Path) -> None:
    (folder / "other").write_bytes(b"{}")
    os.link(folder / "other", folder / "result.json")


def _device(folder: Path, secret: Path) -> None:
    os.mknod(folder / "result.json", 0o600 | 0o020000, os.makedev(1, 5))  # a character device: /dev/zero's numbers


HOSTILE: dict[str, Callable[[Path, Path], None]] = {
    "symlink-to-planted-secret": _symlink("{secret}"),
    "symlink-to-etc-shadow": _symlink("/etc/shadow"),
    "symlink-to-proc-self-environ": _symlink("/proc/self/environ"),
    "symlink-to-dev-zero": _symlink("/dev/zero"),
    "symlink-to-dev-urandom": _symlink("/dev/urandom"),
    "symlink-relative-inside": _symlink("other"),
    "symlink-dangling": _symlink("/nonexistent/result.json"),
    "symlink-loop": _symlink("result.json"),
    "fifo-without-writer": _fifo,
    "directory": _directory,
    "unix-socket": _socket,
    "hard-link-to-host-secret": _hard_link_to_secret,
    "hard-link-inside-the-folder": _hard_link_inside,
    "character-device": _device,
}


@pytest.mark.parametrize("make", HOSTILE.values(), ids=HOSTILE.keys())
def test_anything_but_a_plain_file_is_refused_without_blocking(folder: Path, secret: Path,
                                                                make: Callable[[Path, Path], None]) -> None:
    if make is _device and os.geteuid() != 0:
        pytest.fail("mknod needs root: run the suite as root, as the worker runs")
    make(folder, secret)
    with pytest.raises(InvalidSandboxFile) as caught:
        finishes(lambda: read_sandbox_file(folder, "result.json", CAP))
    assert caught.value.code == "invalid_result"
    assert SECRET.decode() not in str(caught.value)


@pytest.mark.parametrize("name", ["../host-secret", "sub/result.json", "", ".", ".."])
def test_only_one_plain_name_is_accepted(folder: Path, secret: Path, name: str) -> None:
    with pytest.raises(ValueError):
        read_sandbox_file(folder, name, CAP)


def test_a_symlinked_folder_is_not_followed(tmp_path: Path, secret: Path) -> None:
    os.symlink(tmp_path, tmp_path / "linked")
    with pytest.raises(OSError):
        read_sandbox_file(tmp_path / "linked", "host-secret", CAP)


def test_a_populated_folder_is_not_hidden_under_a_mount(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep").write_bytes(b"1")
    with capped_work_dir(work, 1 << 20) as capped:
        assert capped is False and (work / "keep").read_bytes() == b"1"
