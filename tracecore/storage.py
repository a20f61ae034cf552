"""The object store: where bundles, batch artifacts and logs live, behind one small interface.

The interface is deliberately the few calls the platform needs (put, get, exists, delete,
open_read) so that a local folder and S3 (added by the data-plane work) are
interchangeable. Keys are relative POSIX paths such as ``bundles/<org>/<sha256>.zip``;
a key can never name something outside the store, whatever the backend.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from .exceptions import NotFound
from .settings import Settings


@runtime_checkable
class ObjectStore(Protocol):
    """What every object store offers. Objects are immutable blobs addressed by key."""

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing any object there; readers see old or new, never half."""

    def get(self, key: str) -> bytes:
        """The object's bytes; ``NotFound`` when there is none."""

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing object is not an error (retries stay simple)."""

    def open_read(self, key: str) -> BinaryIO:
        """A binary file object to stream a large object; ``NotFound`` when there is none."""


def check_key(key: str) -> str:
    """Refuse keys that could leave the store's root or alias another key.

    ``ValueError`` rather than a user error: keys are built by the platform, so a bad one is a bug.
    """
    if not isinstance(key, str) or not key:
        raise ValueError("an object key must be a non-empty string")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"an object key is a relative POSIX path: {key!r}")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"an object key has no empty, '.' or '..' component: {key!r}")
    return key


class LocalObjectStore:
    """Objects as files under ``root``: the embedded default and the tests' store."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LocalObjectStore({str(self.root)!r})"

    def path(self, key: str) -> Path:
        """The file that holds ``key`` (which need not exist)."""
        return self.root.joinpath(*check_key(key).split("/"))

    def put(self, key: str, data: bytes) -> None:
        # Write a temp file in the target's folder, then rename over the target: the rename is
        # atomic on POSIX, so a crash or a concurrent reader never sees a half-written object.
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        with self.open_read(key) as handle:
            return handle.read()

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def open_read(self, key: str) -> BinaryIO:
        path = self.path(key)
        try:
            return path.open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"no object {key!r} in the object store") from None


def object_store(settings: Settings) -> ObjectStore:
    """The store named by ``TRACE_OBJECT_STORE``: empty = the folder TRACE_HOME/objects.

    ``file:///path`` or a plain path names another local folder. ``s3://`` arrives with the
    data-plane work; until then it is refused here, at start, rather than at the first write.
    """
    spec = settings.object_store.strip()
    if not spec:
        return LocalObjectStore(settings.home_path / "objects")
    if spec.startswith("file://"):
        return LocalObjectStore(Path(spec[len("file://"):]).expanduser())
    if "://" in spec:
        raise ValueError(f"TRACE_OBJECT_STORE: unsupported object store {spec!r} (use a folder path)")
    return LocalObjectStore(Path(spec).expanduser())
