"""Files a sandbox controls: read them as hostile input, and bound how much the sandbox can write.

The docker and process backends share one host folder with the sandbox (``/run/trace``: the
event in, the result out, the gateway socket). The worker reads from it as root, after code
it does not trust had write access to it, so a plain ``open(path).read()`` is a way into the
host: a ``result.json`` replaced by a symlink would copy any host file (``/etc/shadow``, the
worker's ``/proc/self/environ``) into the attempt's stored result; a FIFO would block the
worker forever; a link to ``/dev/zero`` would read without end; and a folder on the host's
disk lets the sandbox fill that disk.

:func:`read_sandbox_file` is the one way the worker reads such a file: one name (no ``/``,
so no path walk) opened relative to a directory fd with ``O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC
| O_NOCTTY`` (a symlink fails with ELOOP, a FIFO opens without waiting for a writer, a lease
cannot make the open wait), then ``fstat`` on what was opened: it must be a regular file with
a single link, else :class:`InvalidSandboxFile`; at most ``max_bytes`` are read, else
:class:`SandboxFileTooLarge`. Neither can block, neither reads outside the folder.

:func:`capped_work_dir` makes the folder its own tmpfs mount (``size=`` the cap, a bound on
inodes, ``nosuid,nodev,noexec``, mode 1770 owned by the worker with the sandbox's group: the
sandbox can create files but not remove or replace the worker's own, such as the gateway
socket and the event). A sandbox that writes past the cap gets ENOSPC inside; the host's disk
is untouched, and the pages are charged to the memory cgroup of the writer (in docker, the
sandbox's own memory limit). Clean-up is a lazy unmount: nothing the sandbox left is walked.

Why a tmpfs that the worker mounts, and not docker's ``--tmpfs``: the gateway's unix socket
must be bound by the worker in the folder the sandbox sees, and a container's tmpfs is not
visible on the host. Why not a loop device: it needs an image file and losetup per
invocation, and a tmpfs mount is one system call. Mounting needs ``CAP_SYS_ADMIN`` (the worker
runs as root in the platform image and here); a worker without it (a non-root docker-group
worker, the process backend's user-namespace mode) falls back to a plain folder with a
warning once per process: the reader's checks still hold, the size cap does not (the process
backend's ``RLIMIT_FSIZE`` still bounds each file).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

SANDBOX_GID = 10001  # the sandbox user's group in every backend (docker's "10001:10001", bwrap's setpriv)
WORK_DIR_INODES = 4096  # files the sandbox may create in the work dir (tmpfs inodes cost kernel memory)
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8
_MNT_DETACH = 2
_warned = threading.Event()


class InvalidSandboxFile(Exception):
    """What the sandbox left under that name is not a plain file the worker may read."""

    code = "invalid_result"

    def __init__(self, name: str, what: str) -> None:
        super().__init__(f"{name} in the sandbox's folder is {what}, not a regular file: not read")
        self.name = name
        self.what = what


class SandboxFileTooLarge(Exception):
    code = "result_too_large"

    def __init__(self, name: str, max_bytes: int) -> None:
        super().__init__(f"{name} in the sandbox's folder exceeds {max_bytes} bytes: not read")
        self.name = name
        self.max_bytes = max_bytes


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return what
    return "not a regular file"


def read_sandbox_file(directory: str | os.PathLike[str], name: str, max_bytes: int) -> bytes | None:
    """The bytes of ``directory/name``, or None when there is no such entry.

    Raises :class:`InvalidSandboxFile` for anything but a regular file with one link (symlink,
    FIFO, socket, device, directory, hard link) and :class:`SandboxFileTooLarge` past ``max_bytes``.
    """
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"one file name, not a path: {name!r}")
    dir_fd = os.open(directory, _DIR_FLAGS)
    try:
        try:
            fd = os.open(name, _OPEN_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InvalidSandboxFile(name, "a symbolic link") from None
            try:  # ENXIO (a socket), EACCES, EWOULDBLOCK (a lease)...: say what it is when lstat can
                what = _kind(os.lstat(name, dir_fd=dir_fd).st_mode)
            except OSError:
                what = f"unreadable ({errno.errorcode.get(exc.errno or 0, exc.errno)})"
            raise InvalidSandboxFile(name, what) from None
    finally:
        os.close(dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidSandboxFile(name, _kind(info.st_mode))
        if info.st_nlink != 1:
            raise InvalidSandboxFile(name, f"a hard link ({info.st_nlink} names)")
        if info.st_size > max_bytes:
            raise SandboxFileTooLarge(name, max_bytes)
        chunks: list[bytes] = []
        kept = 0
        while kept <= max_bytes:  # the size may change under us: the loop, not st_size, is the bound
            chunk = os.read(fd, min(1 << 16, max_bytes + 1 - kept))
            if not chunk:
                break
            chunks.append(chunk)
            kept += len(chunk)
        if kept > max_bytes:
            raise SandboxFileTooLarge(name, max_bytes)
        return b"".join(chunks)
    finally:
        os.close(fd)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def mount_tmpfs(path: Path, max_bytes: int) -> None:
    """Mount a size-capped tmpfs on ``path`` (an existing, empty folder); raises OSError."""
    options = (f"size={max_bytes},nr_inodes={WORK_DIR_INODES},mode=1770,uid={os.geteuid()},"
               f"gid={SANDBOX_GID}").encode()
    if _libc().mount(b"tmpfs", os.fsencode(path), b"tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, options) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mount tmpfs on {path}: {os.strerror(code)}")


def unmount(path: Path) -> None:
    """Lazy unmount: never EBUSY (a container being removed may still hold it), nothing walked."""
    if _libc().umount2(os.fsencode(path), _MNT_DETACH) != 0:
        code = ctypes.get_errno()
        log.warning("cannot unmount the sandbox work dir %s: %s", path, os.strerror(code))


@contextmanager
def capped_work_dir(path: Path, max_bytes: int) -> Iterator[bool]:
    """Make ``path`` a tmpfs of ``max_bytes`` for the block (yields whether the folder is capped).

    A folder that is already a mount point (the udf operator mounts before its gateway binds
    there) is used as it is and left mounted. A folder that already holds files, or a cap of 0,
    is left a plain folder; so is one the worker may not mount on (a warning, once).
    """
    path.mkdir(parents=True, exist_ok=True)
    if os.path.ismount(path):
        yield True
        return
    mounted = False
    with os.scandir(path) as entries:
        empty = next(entries, None) is None
    if max_bytes > 0 and empty:
        try:
            mount_tmpfs(path, max_bytes)
            mounted = True
        except OSError as exc:
            if not _warned.is_set():
                _warned.set()
                log.warning("sandbox work dirs are not size-capped (%s): a sandbox can fill the disk under %s",
                            exc.strerror or exc, path.parent)
    try:
        yield mounted
    finally:
        if mounted:
            unmount(path)


def remove_work_dir(path: Path) -> None:
    """Remove a work dir after its sandbox: unmount if still mounted, then the (fallback) folder's files.

    ``shutil.rmtree`` walks by fd without following symlinks; a nesting deeper than Python's
    recursion limit (only possible in an uncapped folder) is left behind with a warning.
    """
    if os.path.ismount(path):
        unmount(path)
    try:
        shutil.rmtree(path, ignore_errors=True)
    except RecursionError:
        log.warning("sandbox work dir %s is nested too deep to remove", path)


def reap_work_dirs(parent: Path, max_age_s: float) -> int:
    """Remove work dirs a killed worker left under ``parent`` (its tmpfs would hold memory until reboot).

    A work dir's last change (its folder's mtime: the event and the gateway socket are made at the start)
    older than ``max_age_s``, the longest a run can last, belongs to no live run. Answers how many.
    """
    removed = 0
    try:
        with os.scandir(parent) as listing:
            entries = list(listing)
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            age = time.time() - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if age > max_age_s:
            remove_work_dir(Path(entry.path))
            removed += 1
    return removed
