"""One behaviour suite for every object store: the local folder and S3 against a real S3 server.

The S3 store runs against SeaweedFS (``weed mini``, the session fixture ``s3_server``), which
checks signatures: the store reaches it through the standard AWS credential chain (the
environment), as it would reach AWS. Each test gets its own key prefix in the shared bucket,
which is also what makes the prefix isolation test meaningful.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.s3 import S3Server
from tracecore.exceptions import NotFound
from tracecore.infra import storage
from tracecore.infra.storage import LocalObjectStore, ObjectStore, S3ObjectStore, object_store
from tracecore.settings import Settings

StoreFactory = Callable[[str], ObjectStore]


@pytest.fixture(scope="module")
def s3_env(s3_server: S3Server) -> Iterator[S3Server]:
    """The server's credentials in the environment (the standard chain), fresh cached clients."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in s3_server.env().items():
            patch.setenv(name, value)
        storage.reset_clients()
        yield s3_server
    storage.reset_clients()


@pytest.fixture(params=["local", "s3"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Stores of one kind that differ by prefix (a sub-folder, or an S3 key prefix of the bucket)."""
    run = uuid.uuid4().hex[:12]
    if request.param == "local":
        return lambda prefix: LocalObjectStore(tmp_path / run / prefix)
    server: S3Server = request.getfixturevalue("s3_env")
    return lambda prefix: S3ObjectStore(server.bucket, f"tests/{run}/{prefix}", endpoint_url=server.endpoint_url,
                                        region=server.region)


@pytest.fixture
def store(make_store: StoreFactory) -> ObjectStore:
    return make_store("main")


def test_put_get_exists_delete(store: ObjectStore) -> None:
    assert isinstance(store, ObjectStore)
    key = "bundles/org-1/abc.zip"
    assert not store.exists(key)
    store.put(key, b"first")
    assert store.exists(key) and store.get(key) == b"first"
    store.put(key, b"second, longer")  # replaces
    assert store.get(key) == b"second, longer"
    store.put("bundles/org-1/empty", b"")
    assert store.exists("bundles/org-1/empty") and store.get("bundles/org-1/empty") == b""
    store.delete(key)
    assert not store.exists(key)
    store.delete(key)  # deleting a missing object is not an error
    assert store.exists("bundles/org-1/empty")


def test_a_missing_key_is_not_found(store: ObjectStore) -> None:
    with pytest.raises(NotFound):
        store.get("nothing/here")
    with pytest.raises(NotFound):
        store.open_read("nothing/here")
    store.put("folder/object", b"x")
    with pytest.raises(NotFound):  # a "folder" is no object, in either store
        store.get("folder")
    assert not store.exists("folder")


def test_open_read_streams(store: ObjectStore) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    store.put("big/stream.bin", data)
    chunks = []
    with store.open_read("big/stream.bin") as handle:
        while chunk := handle.read(256 * 1024):
            assert len(chunk) <= 256 * 1024
            chunks.append(chunk)
    assert len(chunks) > 1 and b"".join(chunks) == data


@pytest.mark.parametrize("key", ["", "/abs/path", "a/../b", "../escape", "a//b", "./a", "a/.", "a\\b", "a\x00b",
                                 "trailing/"])
def test_keys_are_validated(store: ObjectStore, key: str) -> None:
    for call in (lambda: store.put(key, b"x"), lambda: store.get(key), lambda: store.exists(key),
                 lambda: store.delete(key), lambda: store.open_read(key)):
        with pytest.raises(ValueError):
            call()


def test_prefixes_isolate_stores(make_store: StoreFactory) -> None:
    one, two = make_store("one"), make_store("two")
    one.put("shared/name", b"from one")
    assert not two.exists("shared/name")
    with pytest.raises(NotFound):
        two.get("shared/name")
    two.put("shared/name", b"from two")
    assert one.get("shared/name") == b"from one" and two.get("shared/name") == b"from two"
    two.delete("shared/name")
    assert one.get("shared/name") == b"from one"
    # A nested prefix is another store too: "one/sub" does not see "one"'s keys, nor the reverse.
    nested = make_store("one/sub")
    nested.put("k", b"nested")
    assert not one.exists("shared/k") and not nested.exists("shared/name")


def test_a_20_mb_object_round_trips(store: ObjectStore) -> None:
    data = os.urandom(20 * 1024 * 1024)
    store.put("large/20mb.bin", data)
    assert hashlib.sha256(store.get("large/20mb.bin")).digest() == hashlib.sha256(data).digest()
    digest = hashlib.sha256()
    with store.open_read("large/20mb.bin") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    assert digest.digest() == hashlib.sha256(data).digest()


def test_concurrent_writers_share_one_store(store: ObjectStore) -> None:
    """The S3 store's one cached client serves many threads (the gateway's threads do that)."""
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for i in range(5):
                store.put(f"threads/{n}/{i}", f"{n}:{i}".encode())
                assert store.get(f"threads/{n}/{i}") == f"{n}:{i}".encode()
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors


def test_s3_objects_live_under_the_prefix_in_the_bucket(s3_env: S3Server) -> None:
    prefix = f"tests/{uuid.uuid4().hex[:12]}/layout"
    store = S3ObjectStore(s3_env.bucket, prefix, endpoint_url=s3_env.endpoint_url)
    store.put("a/b.txt", b"payload")
    raw = s3_env.client()
    assert raw.get_object(Bucket=s3_env.bucket, Key=f"{prefix}/a/b.txt")["Body"].read() == b"payload"
    listed = raw.list_objects_v2(Bucket=s3_env.bucket, Prefix=f"{prefix}/")
    assert [item["Key"] for item in listed["Contents"]] == [f"{prefix}/a/b.txt"]


def test_the_s3_server_checks_signatures(s3_env: S3Server) -> None:
    """The server is not anonymous: a store that lost its credentials would fail here, as on AWS."""
    import botocore.exceptions

    key = f"tests/{uuid.uuid4().hex[:12]}/signed"
    s3_env.client().put_object(Bucket=s3_env.bucket, Key=key, Body=b"x")
    for client in (s3_env.client(secret_key="not-the-secret"), s3_env.client(signed=False)):
        with pytest.raises(botocore.exceptions.ClientError) as refused:
            client.get_object(Bucket=s3_env.bucket, Key=key)
        assert refused.value.response["Error"]["Code"] in {"SignatureDoesNotMatch", "AccessDenied"}


def test_one_client_per_process_and_endpoint(s3_env: S3Server) -> None:
    first = S3ObjectStore(s3_env.bucket, "a", endpoint_url=s3_env.endpoint_url)
    second = S3ObjectStore(s3_env.bucket, "b", endpoint_url=s3_env.endpoint_url)
    assert first.client is second.client
    elsewhere = S3ObjectStore(s3_env.bucket, "a", endpoint_url=s3_env.endpoint_url, region="eu-west-1")
    assert elsewhere.client is not first.client


def test_object_store_reads_the_s3_settings(s3_env: S3Server, tmp_path: Path) -> None:
    settings = Settings(home=str(tmp_path), object_store=f"s3://{s3_env.bucket}/tests/from-settings/",
                        s3_endpoint=s3_env.endpoint_url, s3_region="us-east-1")
    store = object_store(settings)
    assert isinstance(store, S3ObjectStore)
    assert (store.bucket, store.prefix, store.endpoint_url, store.region) == (
        s3_env.bucket, "tests/from-settings", s3_env.endpoint_url, "us-east-1")
    store.put("k", b"v")
    assert store.get("k") == b"v"
    env = {"TRACE_OBJECT_STORE": "s3://bucket-name", "TRACE_S3_ENDPOINT": "http://127.0.0.1:1",
           "TRACE_S3_REGION": "eu-central-1"}
    bare = object_store(Settings.from_env(env))
    assert isinstance(bare, S3ObjectStore)
    assert (bare.bucket, bare.prefix, bare.endpoint_url, bare.region) == (
        "bucket-name", "", "http://127.0.0.1:1", "eu-central-1")
    assert Settings().s3_endpoint is None and Settings().s3_region == "us-east-1"
    for spec in ("s3://", "s3://Bad_Bucket/x", "s3://bucket/a/../b", "gs://bucket/x"):
        with pytest.raises(ValueError, match="TRACE_OBJECT_STORE"):
            object_store(Settings(object_store=spec))
