"""The object store: where bundles, batch artifacts and logs live, behind one small interface.

The interface is deliberately the few calls the platform needs (put, get, exists, delete,
open_read) so that a local folder and S3 are interchangeable. Keys are relative POSIX paths
such as ``bundles/<org>/<sha256>.zip``; a key can never name something outside the store,
whatever the backend. An S3 store lives under a key prefix of its bucket, so several
installations (or test sessions) can share one bucket without seeing each other's objects.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol, cast, runtime_checkable

from tracecore.exceptions import NotFound
from tracecore.settings import Settings


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

    def put_file(self, key: str, source: BinaryIO) -> None:
        """``put`` from a file object, copied in chunks (a large export is never held in memory)."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                shutil.copyfileobj(source, handle, 1024 * 1024)
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


# Bucket names as S3 accepts them (3-63 of lower-case letters, digits, dots, hyphens); checked at
# start so that a typo in TRACE_OBJECT_STORE fails there and not at the first write.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# S3 answers a missing object (or bucket) with one of these codes, depending on the call.
_MISSING = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchBucket"})

_clients: dict[tuple[str, str | None, str], Any] = {}
_clients_lock = threading.Lock()


def aws_client(service: Literal["s3", "sts"], *, endpoint_url: str | None, region: str) -> Any:
    """One boto3 client per (service, endpoint, region) per process, created once under a lock.

    boto3 clients are thread-safe but creating one is not (the default session's loaders are
    shared), and creating one per call costs milliseconds and a new connection pool. Credentials
    come from the standard AWS chain (env vars, config files, instance or task role) when the
    client is created. After ``fork`` (Celery's prefork pool) the child drops the parent's
    clients: their pooled sockets belong to the parent.
    """
    key = (service, endpoint_url, region)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            # Path-style addressing for a custom endpoint: 127.0.0.1 or an internal host has no
            # wildcard DNS for <bucket>.<host>. AWS itself keeps the default (virtual-hosted).
            config = Config(retries={"mode": "standard", "max_attempts": 5},
                            s3={"addressing_style": "path"} if endpoint_url else None)
            client = boto3.session.Session().client(service, region_name=region, endpoint_url=endpoint_url,
                                                    config=config)
            _clients[key] = client
        return client


def reset_clients() -> None:
    """Forget the cached clients: after a fork, or when the credentials in the environment change (tests)."""
    with _clients_lock:
        _clients.clear()


def _forget_after_fork() -> None:
    # A new lock too: another thread may have held the parent's at the moment of the fork.
    global _clients_lock
    _clients_lock = threading.Lock()
    _clients.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class S3ObjectStore:
    """Objects in an S3 bucket under ``prefix``: production's store, and any S3-compatible server.

    Object ``k`` is the S3 key ``<prefix>/k``; the prefix is fixed at construction and every key
    is checked with :func:`check_key`, so no key reaches outside the prefix. A single
    ``PutObject`` is atomic in S3 (readers see the old object or the new one, never half), which
    is the protocol's promise for ``put``.
    """

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str = "us-east-1") -> None:
        if not _BUCKET.fullmatch(bucket or ""):
            raise ValueError(f"not an S3 bucket name: {bucket!r}")
        prefix = prefix.strip("/")
        if prefix:
            check_key(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.region = region

    def __repr__(self) -> str:
        where = f", endpoint_url={self.endpoint_url!r}" if self.endpoint_url else ""
        return f"S3ObjectStore({self.bucket!r}, {self.prefix!r}{where})"

    @property
    def client(self) -> Any:
        """The process's shared boto3 S3 client for this endpoint and region."""
        return aws_client("s3", endpoint_url=self.endpoint_url, region=self.region)

    def s3_key(self, key: str) -> str:
        """The S3 key that holds ``key``: the store's prefix, then the checked key."""
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.s3_key(key), Body=data)

    def put_file(self, key: str, source: BinaryIO) -> None:
        """``put`` from a file object: boto3's managed upload reads it in parts (multipart when large)."""
        self.client.upload_fileobj(source, self.bucket, self.s3_key(key))

    def get(self, key: str) -> bytes:
        with self.open_read(key) as handle:
            return handle.read()

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.s3_key(key))
        except Exception as exc:
            if _error_code(exc) in _MISSING:
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        # DeleteObject of a missing key succeeds in S3: retries stay simple, as the protocol asks.
        self.client.delete_object(Bucket=self.bucket, Key=self.s3_key(key))

    def open_read(self, key: str) -> BinaryIO:
        """The object's body as a stream: botocore's StreamingBody reads from the socket as asked."""
        s3_key = self.s3_key(key)
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=s3_key)
        except Exception as exc:
            if _error_code(exc) in _MISSING:
                raise NotFound(f"no object {key!r} in the object store") from None
            raise
        return cast(BinaryIO, answer["Body"])


def parse_s3_url(spec: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (``bucket``, ``some/prefix``); the prefix may be empty."""
    if not spec.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {spec!r}")
    bucket, _, prefix = spec[len("s3://"):].partition("/")
    return bucket, prefix.strip("/")


def object_store(settings: Settings) -> ObjectStore:
    """The store named by ``TRACE_OBJECT_STORE``: empty = the folder TRACE_HOME/objects.

    ``file:///path`` or a plain path names another local folder; ``s3://bucket/prefix`` names
    an S3 store (endpoint ``TRACE_S3_ENDPOINT``, region ``TRACE_S3_REGION``). Anything else is
    refused here, at start, rather than at the first write.
    """
    spec = settings.object_store.strip()
    if not spec:
        return LocalObjectStore(settings.home_path / "objects")
    if spec.startswith("file://"):
        return LocalObjectStore(Path(spec[len("file://"):]).expanduser())
    if spec.startswith("s3://"):
        bucket, prefix = parse_s3_url(spec)
        try:
            return S3ObjectStore(bucket, prefix, endpoint_url=settings.s3_endpoint, region=settings.s3_region)
        except ValueError as exc:
            raise ValueError(f"TRACE_OBJECT_STORE: {exc}") from None
    if "://" in spec:
        raise ValueError(f"TRACE_OBJECT_STORE: unsupported object store {spec!r} (use a folder path or s3://)")
    return LocalObjectStore(Path(spec).expanduser())
