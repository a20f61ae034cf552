"""Bundles: immutable Lambda-style zips, addressed by SHA-256, kept in the object store.

A bundle is untrusted input twice: when it is uploaded (``validate_archive`` reads only the
zip's central directory, and the few bytes of symlink targets, so a hostile archive costs
nothing to refuse) and when a worker unpacks it (``unpack`` re-checks every path and caps
the bytes it really decompresses, because the sizes in the central directory are whatever
the uploader wrote). Between the two, ``fetch_verified`` re-hashes the stored object so a
changed object never runs.

Limits (DESIGN.md, "Bundles"): 50 MB zipped, 250 MB unzipped, 10,000 entries; no absolute
path, no ``..``, no symlink leaving the root. The zip-bomb rule: an entry declaring more
than 1 MiB uncompressed may not expand more than 100 times its compressed size, and the
archive as a whole (when it declares more than 1 MiB) may not expand more than 100 times
its own size. Honest code and data zips rarely pass 10:1.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import re
import stat
import uuid
import zipfile
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Integer, String, UniqueConstraint, Uuid, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Mapped, mapped_column

from tracecore.db.engine import Base, created_at, db, uuid_pk
from tracecore.exceptions import NotFound, PlatformError, ValidationError
from tracecore.infra.storage import ObjectStore

RUNTIMES = ("python3.11", "nodejs", "provided")
MAX_ZIPPED = 50 * 1024 * 1024
MAX_UNZIPPED = 250 * 1024 * 1024
MAX_ENTRIES = 10_000
BOMB_RATIO = 100
BOMB_MIN_SIZE = 1024 * 1024  # below this an entry's ratio is not worth judging
MAX_SYMLINK_TARGET = 4096
MAX_SYMLINK_HOPS = 40  # as Linux's MAXSYMLINKS: a longer chain is a loop
SUPPORTED_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
HANDLER_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-/.]*\.[A-Za-z_$][A-Za-z0-9_$]*$")
_CHUNK = 1024 * 1024


class Bundle(Base):
    __tablename__ = "bundles"
    __table_args__ = (
        # The same bytes with the same runtime and handler are the same bundle (uploads dedupe).
        UniqueConstraint("org_id", "sha256", "runtime", "handler"),
        CheckConstraint("runtime IN ('python3.11', 'nodejs', 'provided')", name="runtime"),
        CheckConstraint("sha256 ~ '^[0-9a-f]{64}$'", name="sha256"),
        CheckConstraint("size > 0 AND entries >= 0 AND unzipped_size >= 0", name="sizes"),
    )
    id: Mapped[uuid.UUID] = uuid_pk()
    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    runtime: Mapped[str] = mapped_column(String(16), nullable=False)
    handler: Mapped[str] = mapped_column(String(128), nullable=False)
    entries: Mapped[int] = mapped_column(Integer, nullable=False)
    unzipped_size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created_by: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("users.id"))
    created_at: Mapped[datetime] = created_at()

    # Not a column: set by save_bundle, True when that call inserted the row (201 vs 200).
    is_new = False

    @property
    def key(self) -> str:
        return bundle_key(self.org_id, self.sha256)


class BundleIntegrityError(PlatformError):
    """The stored object is missing or no longer hashes to the pinned SHA-256: run nothing."""

    code = "integrity_error"


@dataclass(frozen=True)
class ArchiveInfo:
    """What validation learnt about an archive; the row's columns come from here."""

    sha256: str
    size: int
    entries: int
    unzipped_size: int


@dataclass(frozen=True)
class _Entry:
    name: str  # normalized: no empty or '.' components, no trailing slash
    info: zipfile.ZipInfo
    kind: str  # "dir", "file" or "link"
    mode: int  # permission bits from the unix mode (0 when the zip carries none)


def bundle_key(org_id: uuid.UUID | str, sha256: str) -> str:
    return f"bundles/{org_id}/{sha256}.zip"


def _reject(code: str, message: str, *, path: str = "file", entry: str | None = None) -> ValidationError:
    return ValidationError(message, code=code, path=path, details={"entry": entry} if entry is not None else None)


def check_runtime_and_handler(runtime: str, handler: str) -> None:
    """The handler's shape, per runtime: ``module.function`` for Python and Node."""
    if runtime not in RUNTIMES:
        raise _reject("unknown_runtime", f"runtime must be one of {', '.join(RUNTIMES)}", path="runtime")
    if not handler or len(handler) > 128 or any(ch.isspace() for ch in handler):
        raise _reject("invalid_handler", "handler must be 1 to 128 characters without spaces", path="handler")
    if runtime == "provided":
        return  # handed to the bootstrap as _HANDLER; its meaning is the bootstrap's business
    module = handler.rsplit(".", 1)[0]
    if not HANDLER_PATTERN.match(handler) or module.startswith("/") or ".." in module.split("/") \
            or "//" in module or module.endswith("/"):
        raise _reject("invalid_handler", f"handler {handler!r} must look like module.function (e.g. trace.handler)",
                      path="handler")


def validate_archive(data: bytes, runtime: str, handler: str) -> ArchiveInfo:
    """Check an upload without extracting it; raise ``ValidationError`` with a precise code."""
    check_runtime_and_handler(runtime, handler)
    if len(data) > MAX_ZIPPED:
        raise _reject("bundle_too_large", f"a bundle is at most {MAX_ZIPPED} bytes zipped; this one is {len(data)}")
    with _open_zip(data) as archive:
        entries, _ = _scan(archive, len(data))
        files = {entry.name: entry for entry in entries if entry.kind != "dir"}
        _check_handler(files, runtime, handler)
    return ArchiveInfo(sha256=hashlib.sha256(data).hexdigest(), size=len(data), entries=len(entries),
                       unzipped_size=sum(entry.info.file_size for entry in entries))


def _open_zip(data: bytes) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError, NotImplementedError):
        raise _reject("not_a_zip", "the file is not a readable zip archive") from None


def _scan(archive: zipfile.ZipFile, zipped_size: int) -> tuple[list[_Entry], dict[str, str]]:
    """Every check that needs only the central directory (and symlink targets); used by both
    validation and unpacking, so what was accepted is exactly what gets extracted.
    Returns the entries and the symlinks (name -> target), each checked to stay inside."""
    infos = archive.infolist()
    if len(infos) > MAX_ENTRIES:
        raise _reject("too_many_entries", f"a bundle has at most {MAX_ENTRIES} entries; this one has {len(infos)}")
    entries = [_entry(info) for info in infos]
    total = sum(info.file_size for info in infos)
    if total > MAX_UNZIPPED:
        raise _reject("unzipped_too_large", f"a bundle unzips to at most {MAX_UNZIPPED} bytes; this one declares "
                                            f"{total}")
    for info in infos:
        if info.file_size > BOMB_MIN_SIZE and info.file_size > BOMB_RATIO * max(info.compress_size, 1):
            raise _reject("zip_bomb", f"entry expands {info.file_size // max(info.compress_size, 1)}:1 "
                                      f"(the limit is {BOMB_RATIO}:1)", entry=info.filename)
    if total > BOMB_MIN_SIZE and total > BOMB_RATIO * max(zipped_size, 1):
        raise _reject("zip_bomb", f"the archive expands {total // max(zipped_size, 1)}:1 (the limit is "
                                  f"{BOMB_RATIO}:1)")
    _check_layout(entries)
    links = {entry.name: _link_target(archive, entry) for entry in entries if entry.kind == "link"}
    for name, target in links.items():
        if _resolve(posixpath.dirname(name), target, links) is None:
            raise _reject("symlink_escape", f"symlink {name!r} -> {target!r} leaves the bundle", entry=name)
    return entries, links


def _entry(info: zipfile.ZipInfo) -> _Entry:
    name = info.filename
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise _reject("absolute_path", f"entry {name!r} has an absolute path", entry=name)
    parts = re.split(r"[/\\]", name)
    if ".." in parts:
        raise _reject("path_traversal", f"entry {name!r} has a '..' component", entry=name)
    if info.flag_bits & 0x1:
        raise _reject("not_a_zip", f"entry {name!r} is encrypted", entry=name)
    if info.compress_type not in SUPPORTED_METHODS:
        raise _reject("not_a_zip", f"entry {name!r} uses an unsupported compression method", entry=name)
    clean = "/".join(part for part in name.split("/") if part not in ("", "."))
    unix_mode = info.external_attr >> 16
    if stat.S_ISLNK(unix_mode):
        kind = "link"
    elif info.is_dir() or stat.S_ISDIR(unix_mode):
        kind = "dir"
    else:
        kind = "file"
    if not clean:
        if kind != "dir":
            raise _reject("path_traversal", f"entry {name!r} names the bundle's root", entry=name)
    return _Entry(clean, info, kind, stat.S_IMODE(unix_mode))


def _check_layout(entries: list[_Entry]) -> None:
    """One thing per path, and nothing written through a symlink or below a file."""
    kinds: dict[str, str] = {}
    for entry in entries:
        if not entry.name:
            continue
        previous = kinds.get(entry.name)
        if previous is not None and not (previous == entry.kind == "dir"):
            raise _reject("duplicate_entry", f"{entry.name!r} appears twice in the archive", entry=entry.info.filename)
        kinds[entry.name] = entry.kind
    for name in kinds:
        parent = posixpath.dirname(name)
        while parent:
            if kinds.get(parent) == "link":
                raise _reject("symlink_escape", f"entry {name!r} passes through the symlink {parent!r}", entry=name)
            if kinds.get(parent) == "file":
                raise _reject("duplicate_entry", f"entry {name!r} sits below the file {parent!r}", entry=name)
            parent = posixpath.dirname(parent)


def _link_target(archive: zipfile.ZipFile, entry: _Entry) -> str:
    name = entry.info.filename
    if entry.info.file_size > MAX_SYMLINK_TARGET:
        raise _reject("symlink_escape", f"symlink {name!r} has an oversized target", entry=name)
    try:
        with archive.open(entry.info) as handle:
            raw = handle.read(MAX_SYMLINK_TARGET + 1)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError):
        raise _reject("not_a_zip", f"entry {name!r} cannot be read", entry=name) from None
    try:
        target = raw.decode()
    except UnicodeDecodeError:
        raise _reject("symlink_escape", f"symlink {name!r} has an unreadable target", entry=name) from None
    if not target or len(raw) > MAX_SYMLINK_TARGET or "\x00" in target:
        raise _reject("symlink_escape", f"symlink {name!r} has an invalid target", entry=name)
    return target


def _resolve(base: str, target: str, links: dict[str, str]) -> str | None:
    """Where ``target`` (relative to folder ``base``) lands inside the root, following the
    archive's own symlinks the way the kernel would; None when it leaves the root.

    A purely lexical check is not enough: with ``s -> .``, the link ``t -> s/..`` looks like
    ``.`` but really is the root's parent.
    """
    if target.startswith("/"):
        return None
    stack: list[str] = []
    pending = deque([*base.split("/"), *target.split("/")])
    hops = 0
    while pending:
        part = pending.popleft()
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                return None
            stack.pop()
            continue
        stack.append(part)
        current = "/".join(stack)
        if current in links:
            hops += 1
            if hops > MAX_SYMLINK_HOPS or links[current].startswith("/"):
                return None
            stack.pop()
            pending.extendleft(reversed(links[current].split("/")))
    return "/".join(stack)


def _check_handler(files: dict[str, _Entry], runtime: str, handler: str) -> None:
    if runtime == "provided":
        bootstrap = files.get("bootstrap")
        if bootstrap is None or bootstrap.kind != "file" or not bootstrap.mode & 0o111:
            raise _reject("bootstrap_missing", "a 'provided' bundle needs an executable file 'bootstrap' at its "
                                               "root (unix mode with an x bit)", path="file", entry="bootstrap")
        return
    if runtime == "python3.11":
        module = handler.rsplit(".", 1)[0].replace(".", "/")
        candidates = [f"{module}.py", f"{module}/__init__.py"]
    else:
        # Node's runtime takes the module up to the first dot after the last slash.
        folder, _, base = handler.rpartition("/")
        module = (f"{folder}/" if folder else "") + base.split(".", 1)[0]
        candidates = [f"{module}.js", f"{module}.mjs", f"{module}.cjs"]
    if not any(name in files for name in candidates):
        raise _reject("handler_missing", f"handler {handler!r} needs one of {', '.join(candidates)} in the bundle",
                      path="handler")


def save_bundle(org_id: uuid.UUID, data: bytes, runtime: str, handler: str, *, user_id: uuid.UUID | None,
                store: ObjectStore) -> Bundle:
    """Validate, store at ``bundles/<org>/<sha256>.zip`` and insert the row, or find the one that
    exists for the same bytes, runtime and handler (``is_new`` tells which). Flushes, never commits."""
    info = validate_archive(data, runtime, handler)
    key = bundle_key(org_id, info.sha256)
    # Always written: identical bytes under a content address, so a rewrite is harmless, and it
    # repairs an object that was damaged since the first upload.
    store.put(key, data)
    inserted = db.session.scalar(
        insert(Bundle).values(id=uuid.uuid4(), org_id=org_id, sha256=info.sha256, size=info.size, runtime=runtime,
                              handler=handler, entries=info.entries, unzipped_size=info.unzipped_size,
                              created_by=user_id)
        .on_conflict_do_nothing(index_elements=["org_id", "sha256", "runtime", "handler"])
        .returning(Bundle.id))
    bundle = db.session.scalar(select(Bundle).where(
        Bundle.org_id == org_id, Bundle.sha256 == info.sha256, Bundle.runtime == runtime, Bundle.handler == handler))
    assert bundle is not None  # inserted now or by an earlier upload; rows are never deleted here
    bundle.is_new = inserted is not None
    return bundle


def _parse_id(bundle_id: uuid.UUID | str) -> uuid.UUID | None:
    if isinstance(bundle_id, uuid.UUID):
        return bundle_id
    try:
        return uuid.UUID(str(bundle_id))
    except ValueError:
        return None


def get_bundle(org_id: uuid.UUID, bundle_id: uuid.UUID | str) -> Bundle:
    """The org's bundle; another org's bundle and a malformed id look the same: not found."""
    parsed = _parse_id(bundle_id)
    bundle = None if parsed is None else db.session.scalar(
        select(Bundle).where(Bundle.id == parsed, Bundle.org_id == org_id))
    if bundle is None:
        raise NotFound(f"no bundle {bundle_id!s}")
    return bundle


def list_bundles(org_id: uuid.UUID) -> list[Bundle]:
    return list(db.session.scalars(select(Bundle).where(Bundle.org_id == org_id)
                                   .order_by(Bundle.created_at.desc(), Bundle.id)))


def missing_bundles(org_id: uuid.UUID, bundle_ids: list[str]) -> set[str]:
    """Which of ``bundle_ids`` name no bundle of this org (DAG validation, one query)."""
    parsed = {raw: _parse_id(raw) for raw in bundle_ids}
    wanted = {value for value in parsed.values() if value is not None}
    found = set(db.session.scalars(select(Bundle.id).where(Bundle.org_id == org_id, Bundle.id.in_(wanted)))) \
        if wanted else set()
    return {raw for raw, value in parsed.items() if value not in found}


def fetch_verified(bundle: Bundle, store: ObjectStore) -> bytes:
    """The stored bytes, only if they still hash to the pinned SHA-256 (checked before every run)."""
    try:
        data = store.get(bundle.key)
    except NotFound:
        raise BundleIntegrityError(f"bundle {bundle.id}: the stored object {bundle.key} is missing") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != bundle.sha256:
        raise BundleIntegrityError(f"bundle {bundle.id}: the stored object hashes to {actual}, "
                                   f"not the pinned {bundle.sha256}", details={"expected": bundle.sha256,
                                                                                "actual": actual})
    return data


def unpack(data: bytes, dest: Path) -> None:
    """Extract safely into ``dest`` (created if needed) for a sandbox to read.

    Re-runs the path checks, never follows a symlink while writing (files first, with
    O_NOFOLLOW; links last, only those that stay inside), stops with ``zip_bomb`` once the
    real decompressed bytes pass the limit, and leaves dirs 0o755 and files 0o644 (0o755 when
    the zip marks them executable) so a sandbox user of another uid can read them.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with _open_zip(data) as archive:
        entries, links = _scan(archive, len(data))
        written = 0
        for entry in entries:
            if entry.kind == "dir" and entry.name:
                (dest / entry.name).mkdir(parents=True, exist_ok=True)
        for entry in entries:
            if entry.kind == "file":
                written += _extract_file(archive, entry, dest, MAX_UNZIPPED - written)
        for name, target in links.items():  # last: no file is ever written through a link
            path = dest / name
            path.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, path)
    for root, dirs, _files in os.walk(dest):
        for name in dirs:
            child = Path(root) / name
            if not child.is_symlink():
                child.chmod(0o755)
    dest.chmod(0o755)


def _extract_file(archive: zipfile.ZipFile, entry: _Entry, dest: Path, budget: int) -> int:
    """Write one file, counting the bytes really decompressed; returns how many."""
    path = dest / entry.name
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o755 if entry.mode & 0o111 else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    count = 0
    try:
        with os.fdopen(fd, "wb") as out, archive.open(entry.info) as source:
            while chunk := source.read(_CHUNK):
                count += len(chunk)
                if count > budget or count > entry.info.file_size:
                    raise _reject("zip_bomb", f"entry {entry.info.filename!r} decompresses to more than declared "
                                              "or than the bundle limit", entry=entry.info.filename)
                out.write(chunk)
            os.fchmod(out.fileno(), mode)
    except (zipfile.BadZipFile, EOFError, NotImplementedError):
        raise _reject("not_a_zip", f"entry {entry.info.filename!r} is corrupt", entry=entry.info.filename) from None
    return count
