"""Bundle archives without a database: every rejection, content addressing, safe unpacking, the store.

Archives are built in memory with ``zipfile``; hostile ones are crafted entry by entry
(raw ``ZipInfo`` names, unix modes in ``external_attr``, patched central-directory sizes).
"""

from __future__ import annotations

import hashlib
import io
import stat
import struct
import uuid
import warnings
import zipfile
from pathlib import Path

import pytest

from tracecore.exceptions import NotFound, ValidationError
from tracecore.execution import bundles
from tracecore.execution.bundles import Bundle, BundleIntegrityError, fetch_verified, unpack, validate_archive
from tracecore.infra.storage import LocalObjectStore, ObjectStore, object_store
from tracecore.settings import Settings

Member = tuple[str, bytes] | tuple[str, bytes, int]


def member(name: str, data: bytes | str = b"", mode: int = 0o644, *, kind: int = stat.S_IFREG,
           compress: int = zipfile.ZIP_DEFLATED) -> tuple[zipfile.ZipInfo, bytes]:
    """One raw entry: the name exactly as given, ``mode`` as the unix mode in ``external_attr``."""
    info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
    info.external_attr = (kind | mode) << 16
    info.compress_type = compress
    info.create_system = 3
    return info, data.encode() if isinstance(data, str) else data


def link(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    return member(name, target, 0o777, kind=stat.S_IFLNK)


def make_zip(*members: tuple[zipfile.ZipInfo, bytes], level: int | None = None) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names; some tests want them
        with zipfile.ZipFile(buffer, "w", compresslevel=level) as archive:
            for info, data in members:
                archive.writestr(info, data)
    return buffer.getvalue()


PY = (member("trace.py", "def handler(event, context):\n    return event\n"),)


def rejected(data: bytes, code: str, runtime: str = "python3.11", handler: str = "trace.handler") -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        validate_archive(data, runtime, handler)
    assert caught.value.code == code, caught.value.to_dict()
    assert caught.value.http_status == 400
    return caught.value


def patch_central_directory(data: bytes, *, file_size: int | None = None, compress_size: int | None = None,
                            flag_bits: int | None = None) -> bytes:
    """Rewrite fields of every central-directory record (what the uploader claims)."""
    out = bytearray(data)
    start = out.find(b"PK\x01\x02")
    while start != -1:
        if flag_bits is not None:
            out[start + 8:start + 10] = struct.pack("<H", flag_bits)
        if compress_size is not None:
            out[start + 20:start + 24] = struct.pack("<I", compress_size)
        if file_size is not None:
            out[start + 24:start + 28] = struct.pack("<I", file_size)
        start = out.find(b"PK\x01\x02", start + 4)
    return bytes(out)


# --- accepted archives ------------------------------------------------------------------------------------------

def test_a_python_bundle_is_accepted_and_described() -> None:
    data = make_zip(*PY, member("lib/util.py", "X = 1\n"))
    info = validate_archive(data, "python3.11", "trace.handler")
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert (info.size, info.entries) == (len(data), 2)
    assert info.unzipped_size == len("def handler(event, context):\n    return event\n") + len("X = 1\n")


def test_the_same_bytes_give_the_same_sha_and_other_bytes_another() -> None:
    data = make_zip(*PY)
    assert validate_archive(data, "python3.11", "trace.handler").sha256 == \
        validate_archive(bytes(data), "python3.11", "trace.handler").sha256
    other = make_zip(member("trace.py", "def handler(e, c):\n    return 1\n"))
    assert validate_archive(other, "python3.11", "trace.handler").sha256 != \
        validate_archive(data, "python3.11", "trace.handler").sha256


@pytest.mark.parametrize(("files", "handler"), [
    (["trace.py"], "trace.handler"),
    (["pkg/mod.py"], "pkg.mod.fn"),
    (["pkg/mod.py"], "pkg/mod.fn"),
    (["pkg/__init__.py"], "pkg.fn"),
])
def test_python_handlers_map_to_their_files(files: list[str], handler: str) -> None:
    validate_archive(make_zip(*(member(name, "x = 1\n") for name in files)), "python3.11", handler)


@pytest.mark.parametrize("filename", ["index.js", "index.mjs", "index.cjs"])
def test_node_handlers_map_to_js_mjs_or_cjs(filename: str) -> None:
    validate_archive(make_zip(member(filename, "exports.handler = async () => 1;\n")), "nodejs", "index.handler")
    validate_archive(make_zip(member(f"src/{filename}", "")), "nodejs", "src/index.handler")


def test_a_provided_bundle_needs_only_an_executable_bootstrap() -> None:
    validate_archive(make_zip(member("bootstrap", "#!/bin/sh\n", 0o755)), "provided", "anything.here")


def test_symlinks_that_stay_inside_are_fine() -> None:
    data = make_zip(*PY, member("lib/v1/a.py", "A = 1\n"), link("lib/current", "v1"), link("top", "lib/current/a.py"),
                    link("self_dir", "."))
    assert validate_archive(data, "python3.11", "trace.handler").entries == 5


# --- every rejection has its own test ---------------------------------------------------------------------------

@pytest.mark.parametrize("data", [b"", b"hello, world", b"PK\x03\x04 truncated", make_zip(*PY)[:-10]],
                         ids=["empty", "text", "truncated-header", "no-central-directory"])
def test_not_a_zip(data: bytes) -> None:
    rejected(data, "not_a_zip")


def test_bundle_too_large_is_refused_before_parsing() -> None:
    error = rejected(b"\0" * (bundles.MAX_ZIPPED + 1), "bundle_too_large")
    assert error.details["path"] == "file"


def test_unzipped_too_large_from_the_declared_sizes() -> None:
    data = patch_central_directory(make_zip(*PY, member("big.bin", b"x" * 1000)), file_size=130 * 1024 * 1024)
    rejected(data, "unzipped_too_large")


def test_too_many_entries() -> None:
    members = [member(f"f{i}", b"", compress=zipfile.ZIP_STORED) for i in range(bundles.MAX_ENTRIES + 1)]
    rejected(make_zip(*PY, *members), "too_many_entries")


def test_zip_bomb_one_entry_over_the_ratio() -> None:
    data = make_zip(*PY, member("zeros.bin", bytes(8 * 1024 * 1024)), level=1)
    assert len(data) < 100_000  # 8 MiB became a few KB: far above 100:1
    error = rejected(data, "zip_bomb")
    assert error.details["entry"] == "zeros.bin"


def test_zip_bomb_the_whole_archive_over_the_ratio() -> None:
    """Each entry stays under 1 MiB (not judged alone), together they expand far past 100:1."""
    data = make_zip(*PY, *(member(f"part{i}.bin", bytes(900 * 1024)) for i in range(20)), level=1)
    error = rejected(data, "zip_bomb")
    assert "entry" not in error.details


def test_a_compressible_but_honest_file_is_not_a_bomb() -> None:
    data = make_zip(*PY, member("small.txt", bytes(512 * 1024)))  # < 1 MiB: its ratio is not judged
    validate_archive(data, "python3.11", "trace.handler")


def test_absolute_path() -> None:
    error = rejected(make_zip(*PY, member("/etc/x", "owned")), "absolute_path")
    assert error.details["entry"] == "/etc/x"


@pytest.mark.parametrize("name", ["../x", "a/../../x", "lib/../../../etc/cron.d/x", "..\\x"])
def test_path_traversal(name: str) -> None:
    assert rejected(make_zip(*PY, member(name, "owned")), "path_traversal").details["entry"] == name


@pytest.mark.parametrize("links", [
    [("evil", "../../etc/passwd")],
    [("evil", "/etc/passwd")],
    [("deep/evil", "../../outside")],
    [("s", "."), ("t", "s/..")],  # lexically "." but really the root's parent
    [("a", "b"), ("b", "a")],  # a loop resolves nowhere
], ids=["dotdot", "absolute", "nested", "through-a-link", "loop"])
def test_symlink_escape(links: list[tuple[str, str]]) -> None:
    rejected(make_zip(*PY, *(link(name, target) for name, target in links)), "symlink_escape")


def test_an_entry_written_through_a_symlink_is_refused() -> None:
    rejected(make_zip(*PY, link("d", "lib"), member("d/x.py", "x")), "symlink_escape")


def test_a_path_used_twice_is_refused() -> None:
    rejected(make_zip(*PY, member("a.py", "1"), member("a.py", "2")), "duplicate_entry")
    rejected(make_zip(*PY, member("a", "file"), member("a/b", "below a file")), "duplicate_entry")


@pytest.mark.parametrize(("runtime", "handler", "files"), [
    ("python3.11", "trace.handler", ["other.py"]),
    ("python3.11", "pkg.mod.fn", ["pkg/other.py"]),
    ("python3.11", "trace.handler", ["trace.js"]),
    ("nodejs", "index.handler", ["index.py"]),
    ("nodejs", "src/index.handler", ["index.js"]),
])
def test_handler_missing(runtime: str, handler: str, files: list[str]) -> None:
    error = rejected(make_zip(*(member(name, "x") for name in files)), "handler_missing", runtime, handler)
    assert error.details["path"] == "handler"


@pytest.mark.parametrize("members", [
    [member("other", "#!/bin/sh\n", 0o755)],
    [member("bootstrap", "#!/bin/sh\n", 0o644)],
    [member("bin/bootstrap", "#!/bin/sh\n", 0o755)],
    [member("bootstrap/", "", 0o755, kind=stat.S_IFDIR)],
    [link("bootstrap", "real"), member("real", "#!/bin/sh\n", 0o755)],
], ids=["absent", "not-executable", "not-at-root", "a-folder", "a-symlink"])
def test_bootstrap_missing(members: list[tuple[zipfile.ZipInfo, bytes]]) -> None:
    rejected(make_zip(*members), "bootstrap_missing", "provided", "x")


def test_unknown_runtime() -> None:
    assert rejected(make_zip(*PY), "unknown_runtime", "python2.7").details["path"] == "runtime"


@pytest.mark.parametrize("handler", ["", "nodot", "trace.", ".handler", "../trace.handler", "/abs.handler",
                                     "a b.handler", "trace.1fn", "x" * 130 + ".fn"])
def test_invalid_handler(handler: str) -> None:
    assert rejected(make_zip(*PY), "invalid_handler", handler=handler).details["path"] == "handler"


def test_an_encrypted_entry_is_not_a_usable_zip() -> None:
    rejected(patch_central_directory(make_zip(*PY), flag_bits=0x1), "not_a_zip")


# --- unpack -----------------------------------------------------------------------------------------------------

def test_unpack_preserves_the_exec_bit_and_leaves_everything_readable(tmp_path: Path) -> None:
    data = make_zip(member("bootstrap", "#!/bin/sh\necho hi\n", 0o700), member("lib/data.txt", "d", 0o600),
                    member("empty/", "", 0o700, kind=stat.S_IFDIR), link("lib/alias", "data.txt"))
    dest = tmp_path / "task"
    unpack(data, dest)
    assert stat.S_IMODE((dest / "bootstrap").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "lib" / "data.txt").stat().st_mode) == 0o644
    for folder in (dest, dest / "lib", dest / "empty"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert (dest / "bootstrap").read_text() == "#!/bin/sh\necho hi\n"
    assert (dest / "lib" / "alias").is_symlink() and (dest / "lib" / "alias").read_text() == "d"


def test_unpack_without_unix_modes_gives_plain_readable_files(tmp_path: Path) -> None:
    info, data = member("trace.py", "x = 1\n")
    info.external_attr, info.create_system = 0, 0
    unpack(make_zip((info, data)), tmp_path / "task")
    assert stat.S_IMODE((tmp_path / "task" / "trace.py").stat().st_mode) == 0o644


@pytest.mark.parametrize(("members", "code"), [
    ([member("../escaped", "x")], "path_traversal"),
    ([member("/tmp/escaped", "x")], "absolute_path"),
    ([link("escaped", "../escaped-target")], "symlink_escape"),
    ([link("s", "."), link("escaped", "s/..")], "symlink_escape"),
    ([link("d", ".."), member("d/escaped", "x")], "symlink_escape"),
], ids=["dotdot", "absolute", "symlink", "symlink-through-link", "write-through-link"])
def test_unpack_refuses_escapes_and_writes_nothing_outside(tmp_path: Path, members: list, code: str) -> None:
    outside = sorted(path.name for path in tmp_path.iterdir())
    with pytest.raises(ValidationError) as caught:
        unpack(make_zip(*PY, *members), tmp_path / "task")
    assert caught.value.code == code
    assert sorted(path.name for path in tmp_path.iterdir() if path.name != "task") == outside
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "escaped-target").exists()


def test_unpack_never_writes_more_than_an_entry_declares(tmp_path: Path) -> None:
    """A central directory that under-declares an entry: decompression stops at the declared
    size and the CRC check fails, so the extra bytes never reach the disk."""
    honest = make_zip(member("trace.py", "def handler(e, c):\n    return 1\n" * 100))
    lying = patch_central_directory(honest, file_size=10)
    with pytest.raises(ValidationError) as caught:
        unpack(lying, tmp_path / "task")
    assert caught.value.code == "not_a_zip"
    written = tmp_path / "task" / "trace.py"
    assert not written.exists() or written.stat().st_size <= 10


def test_unpack_caps_the_real_decompressed_bytes(tmp_path: Path) -> None:
    """Defence in depth below the declared sizes: the running total of real bytes is capped too."""
    data = make_zip(member("blob.bin", b"y" * 5000))
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        entries, _ = bundles._scan(archive, len(data))
        (tmp_path / "task").mkdir()
        with pytest.raises(ValidationError) as caught:
            bundles._extract_file(archive, entries[0], tmp_path / "task", budget=1000)
    assert caught.value.code == "zip_bomb"


def test_unpack_rejects_a_bomb_like_validation(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as caught:
        unpack(make_zip(member("zeros.bin", bytes(4 * 1024 * 1024)), level=1), tmp_path / "task")
    assert caught.value.code == "zip_bomb"


# --- the object store and integrity -----------------------------------------------------------------------------

def test_local_store_round_trip(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    assert isinstance(store, ObjectStore)
    assert not store.exists("a/b.bin")
    store.put("a/b.bin", b"one")
    store.put("a/b.bin", b"two")  # replaces
    assert store.exists("a/b.bin") and store.get("a/b.bin") == b"two"
    with store.open_read("a/b.bin") as handle:
        assert handle.read() == b"two"
    assert [path.name for path in (tmp_path / "objects" / "a").iterdir()] == ["b.bin"]  # no temp files left
    store.delete("a/b.bin")
    store.delete("a/b.bin")  # idempotent
    assert not store.exists("a/b.bin")
    with pytest.raises(NotFound):
        store.get("a/b.bin")
    with pytest.raises(NotFound):
        store.open_read("a")


@pytest.mark.parametrize("key", ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a\\b", "a/\x00"])
def test_local_store_refuses_keys_that_could_leave_it(tmp_path: Path, key: str) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    for call in (lambda: store.put(key, b"x"), lambda: store.get(key), lambda: store.exists(key)):
        with pytest.raises(ValueError):
            call()
    assert not (tmp_path / "x").exists()


def test_object_store_from_settings(tmp_path: Path) -> None:
    default = object_store(Settings(home=str(tmp_path / "home")))
    assert isinstance(default, LocalObjectStore) and default.root == tmp_path / "home" / "objects"
    named = object_store(Settings(home=str(tmp_path), object_store=str(tmp_path / "elsewhere")))
    assert isinstance(named, LocalObjectStore) and named.root == tmp_path / "elsewhere"
    assert Settings.from_env({"TRACE_OBJECT_STORE": "/srv/objects"}).object_store == "/srv/objects"
    with pytest.raises(ValueError, match="TRACE_OBJECT_STORE"):
        object_store(Settings(object_store="ftp://host/x"))


def _bundle_row(data: bytes) -> Bundle:
    return Bundle(id=uuid.uuid4(), org_id=uuid.uuid4(), sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                  runtime="python3.11", handler="trace.handler", entries=1, unzipped_size=1)


def test_fetch_verified_rehashes_the_stored_object(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    data = make_zip(*PY)
    bundle = _bundle_row(data)
    assert bundle.key == f"bundles/{bundle.org_id}/{bundle.sha256}.zip"
    store.put(bundle.key, data)
    assert fetch_verified(bundle, store) == data
    store.put(bundle.key, data + b"tampered")
    with pytest.raises(BundleIntegrityError) as caught:
        fetch_verified(bundle, store)
    assert caught.value.code == "integrity_error" and caught.value.details["expected"] == bundle.sha256
    store.delete(bundle.key)
    with pytest.raises(BundleIntegrityError):
        fetch_verified(bundle, store)
