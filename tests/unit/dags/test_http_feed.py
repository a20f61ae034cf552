"""Unit tests of tracecore.dags.http_feed: an http_ingest job's config, the allowlist, the address
check, JSON pointers and records to rows; and the DAG parser's checks of an http_ingest job."""

from __future__ import annotations

from typing import Any

import pytest

from tracecore.dags import http_feed
from tracecore.dags.http_feed import FeedConfig, FeedError
from tracecore.dags.spec import parse_dag
from tracecore.exceptions import ValidationError
from tracecore.execution.operators import CATALOG

# -- config -------------------------------------------------------------------------------------


def test_a_full_config_is_read() -> None:
    feed, problems = http_feed.check_config({"url": "https://api.example.com/v1/prices?limit=5", "records": "/data",
                                             "fields": {"symbol": "/sym", "usd": "/quote/usd"},
                                             "headers": {"Accept-Language": "en"}})
    assert problems == []
    assert feed == FeedConfig("https://api.example.com/v1/prices?limit=5", "/data",
                              (("symbol", "/sym"), ("usd", "/quote/usd")), (("Accept-Language", "en"),))


@pytest.mark.parametrize(("config", "code", "path"), [
    ({}, "missing_key", "config.url"),
    ({"url": 5}, "invalid_type", "config.url"),
    ({"url": "ftp://example.com/x"}, "invalid_url", "config.url"),
    ({"url": "file:///etc/passwd"}, "invalid_url", "config.url"),
    ({"url": "https://user:pw@example.com/"}, "invalid_url", "config.url"),
    ({"url": "https://example.com/#top"}, "invalid_url", "config.url"),
    ({"url": "https://example.com/a b"}, "invalid_url", "config.url"),
    ({"url": "https://example.com:99999/"}, "invalid_url", "config.url"),
    ({"url": "https:///nohost"}, "invalid_url", "config.url"),
    ({"url": "https://exämple.com/"}, "invalid_url", "config.url"),
    ({"url": "https://example.com/" + "a" * 3000}, "invalid_url", "config.url"),
    ({"url": "https://example.com/", "records": "data"}, "invalid_pointer", "config.records"),
    ({"url": "https://example.com/", "records": "/a~2"}, "invalid_pointer", "config.records"),
    ({"url": "https://example.com/", "records": 3}, "invalid_type", "config.records"),
    ({"url": "https://example.com/", "fields": {"Bad Name": "/x"}}, "invalid_value", "config.fields.Bad Name"),
    ({"url": "https://example.com/", "fields": {"ok": "x"}}, "invalid_pointer", "config.fields.ok"),
    ({"url": "https://example.com/", "fields": ["a"]}, "invalid_type", "config.fields"),
    ({"url": "https://example.com/", "headers": {"Host": "evil"}}, "invalid_value", "config.headers.Host"),
    ({"url": "https://example.com/", "headers": {"X-A": "a\r\nX-B: b"}}, "invalid_value", "config.headers.X-A"),
    ({"url": "https://example.com/", "headers": {"bad header": "x"}}, "invalid_value", "config.headers"),
    ({"url": "https://example.com/", "headers": {f"X-{i}": "v" for i in range(21)}}, "invalid_value",
     "config.headers"),
    ({"url": "https://example.com/", "method": "POST"}, "unknown_key", "config.method"),
])
def test_a_bad_config_is_refused_with_its_path(config: dict[str, Any], code: str, path: str) -> None:
    feed, problems = http_feed.check_config(config)
    assert feed is None
    assert (code, path) in [(c, p) for c, p, _ in problems], problems


# -- JSON pointers ------------------------------------------------------------------------------


def test_pointers_follow_rfc_6901() -> None:
    document = {"a/b": {"m~n": [10, 20]}, "": 1}
    assert http_feed.resolve_pointer(document, "") is document
    assert http_feed.resolve_pointer(document, "/a~1b/m~0n/1") == 20
    assert http_feed.resolve_pointer(document, "/") == 1
    for pointer in ("/missing", "/a~1b/m~0n/2", "/a~1b/m~0n/01", "/a~1b/m~0n/-", "/a~1b/m~0n/0/x"):
        with pytest.raises(LookupError):
            http_feed.resolve_pointer(document, pointer)


# -- records to rows ----------------------------------------------------------------------------

SCHEMA = [{"name": "id", "type": "int64", "nullable": False}, {"name": "price", "type": "float64", "nullable": True},
          {"name": "meta", "type": "string", "nullable": True}, {"name": "tags", "type": "list<string>",
                                                                   "nullable": True}]


def test_records_become_rows_of_the_declared_columns() -> None:
    body = {"data": {"items": [{"id": 1, "price": 2.5, "meta": {"a": [1]}, "tags": ["x"], "extra": "dropped"},
                               {"id": 2}]}}
    rows = http_feed.rows_of(body, FeedConfig("https://x.example/", "/data/items"), SCHEMA)
    assert rows == [{"id": 1, "price": 2.5, "meta": '{"a":[1]}', "tags": ["x"]}, {"id": 2}]


def test_without_a_schema_a_record_keeps_its_keys_and_nested_values_become_text() -> None:
    rows = http_feed.rows_of([{"id": 1, "nested": {"k": "v"}}], FeedConfig("https://x.example/"), None)
    assert rows == [{"id": 1, "nested": '{"k":"v"}'}]


def test_one_object_is_one_record_and_fields_pick_by_pointer() -> None:
    body = {"bitcoin": {"usd": 97000.5, "last_updated_at": 1733380000}}
    feed = FeedConfig("https://x.example/", "", (("coin", "/bitcoin/missing"), ("usd", "/bitcoin/usd"),
                                                  ("at", "/bitcoin/last_updated_at")))
    assert http_feed.rows_of(body, feed, None) == [{"coin": None, "usd": 97000.5, "at": 1733380000}]


def test_values_keep_their_json_types_for_the_publish_to_judge() -> None:
    rows = http_feed.rows_of([{"id": "1", "price": "cheap"}], FeedConfig("https://x.example/"), SCHEMA)
    assert rows == [{"id": "1", "price": "cheap"}]  # publish refuses them as schema_mismatch, nothing coerced


@pytest.mark.parametrize(("body", "records", "words"), [
    ({"data": []}, "/items", "no key 'items'"),
    ([1, 2], "", "record 0 is a number"),
    ({"data": ["a"]}, "/data", "record 0 is a string"),
    ("just text", "/x", "goes into a string"),
    ([{"Price USD": 1}], "", "'Price USD', which is not a column name"),
])
def test_records_that_are_not_objects_fail_with_invalid_records(body: Any, records: str, words: str) -> None:
    with pytest.raises(FeedError) as failed:
        http_feed.rows_of(body, FeedConfig("https://x.example/", records), None)
    assert failed.value.reason == "invalid_records"
    assert words in failed.value.message


# -- the allowlist ------------------------------------------------------------------------------


def _allowed(url: str, *entries: str) -> str | None:
    entry = http_feed.allowed_by(url, http_feed.parse_allowlist(entries))
    return entry.text if entry else None


@pytest.mark.parametrize(("url", "entry", "allowed"), [
    ("https://api.example.com/v1/prices", "https://api.example.com/v1/", True),
    ("https://api.example.com/v1", "https://api.example.com/v1/", False),
    ("https://api.example.com/v10/x", "https://api.example.com/v1", False),
    ("https://api.example.com/v1/x", "https://api.example.com/v1", True),
    ("https://api.example.com/v1?x=1", "https://api.example.com/v1", True),
    ("http://api.example.com/v1/prices", "https://api.example.com/v1/", False),
    ("https://api.example.com:8443/v1/", "https://api.example.com/v1/", False),
    ("https://API.Example.COM./v1/", "https://api.example.com/", True),
    ("https://api.example.com/anything", "api.example.com", True),
    ("http://api.example.com/anything", "api.example.com", False),
    ("https://api.example.com:8443/", "api.example.com:8443", True),
    ("https://api.example.com.evil.test/", "api.example.com", False),
    ("https://a.b.example.com/", "*.example.com", True),
    ("https://example.com/", "*.example.com", False),
    ("https://badexample.com/", "*.example.com", False),
    ("http://127.0.0.1:8080/feed", "http://127.0.0.1:8080/", True),
    ("http://127.0.0.1:8081/feed", "http://127.0.0.1:8080/", False),
    ("http://[::1]:8080/feed", "http://[::1]:8080/", True),
])
def test_the_allowlist_matches_scheme_host_port_and_path(url: str, entry: str, allowed: bool) -> None:
    assert (_allowed(url, entry) == entry) is allowed


def test_an_entry_naming_the_host_wins_over_a_wildcard() -> None:
    assert _allowed("https://feed.example.com/x", "*.example.com", "feed.example.com") == "feed.example.com"
    entries = http_feed.parse_allowlist(["*.example.com", "feed.example.com"])
    assert not entries[0].names_host("feed.example.com") and entries[1].names_host("FEED.example.com.")


@pytest.mark.parametrize("entry", ["*.com", "*", "ftp://example.com/", "https://example.com/?q=1",
                                   "example.com/path", "https://*.10.0.0.1/", "https://user@example.com/",
                                   "a.*.example.com", "https://ex ample.com/"])
def test_a_bad_allowlist_entry_is_named(entry: str) -> None:
    with pytest.raises(ValueError, match="allowlist entry"):
        http_feed.parse_allowlist(["api.example.com", entry])


# -- addresses ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("address", "reason"), [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"), ("192.168.1.1", "private"),
    ("172.16.0.1", "private"), ("169.254.169.254", "link-local (cloud metadata)"), ("fe80::1%eth0", "link-local"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("224.0.0.1", "multicast"),
    ("::ffff:127.0.0.1", "loopback"), ("64:ff9b::a9fe:a9fe", "link-local (cloud metadata)"),
    ("100.64.0.1", "not globally routable"), ("fd00::1", "private"), ("240.0.0.1", "private"),
    ("not-an-ip", "not an IP address"),
])
def test_internal_addresses_are_named(address: str, reason: str) -> None:
    found = http_feed.internal_address(address)
    assert found is not None and found.startswith(reason), found


@pytest.mark.parametrize("address", ["93.184.215.14", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address: str) -> None:
    assert http_feed.internal_address(address) is None


# -- the job in a DAG ---------------------------------------------------------------------------

GOOD = {"name": "prices", "activation": "scheduled", "schedule": {"every": "1m"}, "runtime": "platform",
        "operator": "http_ingest", "unique_key": ["id"],
        "outputs": [{"dataset": "prices", "kind": "buffered"}],
        "config": {"url": "https://api.example.com/v1/prices", "records": "/data"}}


def test_an_http_ingest_job_validates() -> None:
    spec = parse_dag([GOOD], operators=CATALOG)
    job = spec.job("prices")
    assert job.operator == "http_ingest" and job.output_datasets[0]["kind"] == "buffered"
    assert job.schedule is not None and job.schedule.every_s == 60


@pytest.mark.parametrize(("change", "code", "path"), [
    ({"runtime": "lambda"}, "invalid_value", "jobs[0].runtime"),
    ({"config": None}, "missing_key", "jobs[0].config"),
    ({"config": {"url": "gopher://x.example/"}}, "invalid_url", "jobs[0].config.url"),
    ({"config": {"url": "https://x.example/", "records": "data"}}, "invalid_pointer", "jobs[0].config.records"),
    ({"outputs": 1}, "invalid_value", "jobs[0].outputs"),
    ({"outputs": None}, "invalid_value", "jobs[0].outputs"),
    ({"outputs": [{"dataset": "prices", "kind": "derived"}]}, "invalid_value", "jobs[0].outputs"),
    ({"outputs": [{"dataset": "a", "kind": "buffered"}, {"dataset": "b", "kind": "buffered"}]}, "invalid_value",
     "jobs[0].outputs"),
    ({"unique_key": None}, "missing_key", "jobs[0].unique_key"),
    ({"inputs": [{"from": {"job": "block_follower", "output": 0}}]}, "invalid_value", "jobs[0].inputs"),
])
def test_an_http_ingest_job_is_refused_at_save_time(change: dict[str, Any], code: str, path: str) -> None:
    job = {**GOOD, **change}
    with pytest.raises(ValidationError) as refused:
        parse_dag([job], operators=CATALOG, external_outputs=lambda name: 1 if name == "block_follower" else None)
    errors = [(error["code"], error["path"]) for error in refused.value.details["errors"]]
    assert (code, path) in errors, errors
