"""Off-chain feeds: what an ``http_ingest`` job may fetch, and how its JSON becomes rows.

Pure (stdlib and ``tracecore.data.schema``): the DAG parser checks a job's ``config`` here when
the DAG is saved, and the operator (``workers/operators/http_ingest.py``) reads the same config,
matches its URL against the installation's allowlist and turns the answer into rows with the
same functions, so what was accepted at save time is what runs.

Why an allowlist and an address check both: the allowlist says which outside APIs the
installation trusts (``TRACE_HTTP_INGEST_ALLOWLIST``, seed 003: platform jobs reach allowlisted
endpoints only); the address check stops a trusted *name* from leading somewhere inside (a
wildcard entry's subdomain, or a DNS answer, that points at 127.0.0.1, 10.x, or the cloud
metadata service at 169.254.169.254). An internal address is reached only when the entry that
matched names that very host, not through a wildcard: an administrator who writes
``http://10.0.0.5:8080/`` means it.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from tracecore.data.schema import COLUMN_NAME_RE

CONFIG_KEYS = ("url", "records", "fields", "headers")
MAX_URL_LENGTH = 2048
MAX_HEADERS = 20
MAX_FIELDS = 1000
# Headers the operator sets itself (or that would change how the answer is framed or encoded).
RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "accept-encoding", "te",
                              "upgrade", "keep-alive", "proxy-authorization", "proxy-connection", "trailer"})
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]{0,1024}")
_POINTER_ESCAPE = re.compile(r"~(?![01])")
_ASCII_HOST = re.compile(r"[a-z0-9.:\[\]_-]+")
DEFAULT_PORTS = {"http": 80, "https": 443}
# NAT64 (RFC 6052): an IPv6 address that carries an IPv4 one; the IPv4 one is what is reached.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

Problem = tuple[str, str, str]  # (code, path, message), as the DAG parser reports them


@dataclass(frozen=True)
class FeedConfig:
    """An ``http_ingest`` job's config: the URL, where the records are, how a record becomes a row.

    ``records`` is a JSON pointer (RFC 6901) into the answer, ``""`` the whole answer; ``fields``
    maps a column to a pointer inside one record (empty: the record's own top-level keys).
    """

    url: str
    records: str = ""
    fields: tuple[tuple[str, str], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()


class FeedError(Exception):
    """The answer cannot become rows; ``reason`` is the attempt's exit reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


# -- the config (checked at save time, read again by the operator) -----------------------------


def check_config(raw: Any, path: str = "config") -> tuple[FeedConfig | None, list[Problem]]:
    """The config and every problem in it (paths like ``jobs[0].config.url``)."""
    if not isinstance(raw, Mapping):
        return None, [("invalid_type", path, "an http_ingest config is a mapping {url, records, fields, headers}")]
    known = ", ".join(CONFIG_KEYS)
    problems: list[Problem] = [("unknown_key", f"{path}.{key}", f"unknown key {key!r} (known: {known})")
                               for key in raw if key not in CONFIG_KEYS]
    spec = {key: value for key, value in raw.items() if key in CONFIG_KEYS and value is not None}
    url = spec.get("url")
    if url is None:
        problems.append(("missing_key", f"{path}.url", "http_ingest needs 'url', the JSON document to fetch"))
    elif not isinstance(url, str):
        problems.append(("invalid_type", f"{path}.url", "expected string"))
    elif (problem := url_problem(url)) is not None:
        problems.append(("invalid_url", f"{path}.url", problem))
    records = spec.get("records", "")
    if not isinstance(records, str):
        problems.append(("invalid_type", f"{path}.records", "expected a JSON pointer string such as /data/items"))
    elif (problem := pointer_problem(records)) is not None:
        problems.append(("invalid_pointer", f"{path}.records", problem))
    fields = _pairs(spec.get("fields", {}), f"{path}.fields", MAX_FIELDS, problems)
    for column, pointer in fields:
        if not COLUMN_NAME_RE.fullmatch(column):
            problems.append(("invalid_value", f"{path}.fields.{column}",
                             f"column name {column!r} must match ^[a-z][a-z0-9_]{{0,62}}$"))
        elif (problem := pointer_problem(pointer)) is not None:
            problems.append(("invalid_pointer", f"{path}.fields.{column}", problem))
    headers = _pairs(spec.get("headers", {}), f"{path}.headers", MAX_HEADERS, problems)
    for name, value in headers:
        if not _TOKEN.fullmatch(name):
            problems.append(("invalid_value", f"{path}.headers", f"{name[:70]!r} is not an HTTP header name"))
        elif name.lower() in RESERVED_HEADERS:
            problems.append(("invalid_value", f"{path}.headers.{name}", f"header {name!r} is set by the platform"))
        elif not _HEADER_VALUE.fullmatch(value):
            problems.append(("invalid_value", f"{path}.headers.{name}",
                             "a header value is printable ASCII, at most 1024 characters"))
    if problems or not isinstance(url, str):
        return None, problems
    return FeedConfig(url, records if isinstance(records, str) else "", fields, headers), problems


def _pairs(raw: Any, path: str, limit: int, problems: list[Problem]) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, Mapping):
        problems.append(("invalid_type", path, "expected a mapping of strings"))
        return ()
    if len(raw) > limit:
        problems.append(("invalid_value", path, f"at most {limit} entries"))
        return ()
    pairs = []
    for key, value in raw.items():
        if not isinstance(key, str) or not isinstance(value, str):
            problems.append(("invalid_type", f"{path}.{key}", "expected a string"))
        else:
            pairs.append((key, value))
    return tuple(pairs)


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be fetched (whatever the allowlist says), or None."""
    if len(url) > MAX_URL_LENGTH:
        return f"a URL has at most {MAX_URL_LENGTH} characters"
    if any(ord(c) <= 0x20 or ord(c) >= 0x7f for c in url):
        return "a URL is ASCII without spaces or control characters (percent-encode the rest)"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a port out of range or not a number
    except ValueError as exc:
        return f"not a URL: {exc}"
    if parts.scheme not in DEFAULT_PORTS:
        return "the URL's scheme must be http or https"
    if not parts.hostname or not _ASCII_HOST.fullmatch(parts.hostname):
        return "the URL needs a host"
    if parts.username is not None or parts.password is not None:
        return "credentials in the URL are not allowed"
    if parts.fragment or url.endswith("#"):
        return "a URL to fetch has no fragment"
    return None


# -- JSON pointers ------------------------------------------------------------------------------


def pointer_problem(pointer: str) -> str | None:
    if pointer and not pointer.startswith("/"):
        return f"a JSON pointer is empty or starts with '/', got {pointer[:80]!r}"
    if _POINTER_ESCAPE.search(pointer):
        return "in a JSON pointer '~' is written ~0 and '/' ~1"
    return None


def resolve_pointer(document: Any, pointer: str) -> Any:
    """The value ``pointer`` names in ``document``; LookupError says where it stops."""
    value = document
    if not pointer:
        return value
    for depth, raw in enumerate(pointer[1:].split("/")):
        token = raw.replace("~1", "/").replace("~0", "~")
        at = "/" + "/".join(pointer[1:].split("/")[:depth + 1])
        if isinstance(value, dict):
            if token not in value:
                raise LookupError(f"no key {token!r} at {at}")
            value = value[token]
        elif isinstance(value, list):
            if not token.isdigit() or (token != "0" and token.startswith("0")) or int(token) >= len(value):
                raise LookupError(f"no item {token!r} at {at} (a list of {len(value)})")
            value = value[int(token)]
        else:
            raise LookupError(f"{at} goes into a {_kind(value)}, which has no members")
    return value


# -- records to rows ----------------------------------------------------------------------------


def rows_of(document: Any, feed: FeedConfig, columns: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """The rows of one answer: the records ``feed.records`` points at (a list, or one object),
    each a row of ``feed.fields`` (or of its own keys). With a declared schema only its columns
    are taken (an API's extra keys are not the dataset's business); a nested object or list goes
    into a text column as its JSON text. Values keep their JSON types otherwise: one that does not
    fit its column is refused by the publish (``schema_mismatch``), never coerced."""
    try:
        found = resolve_pointer(document, feed.records)
    except LookupError as exc:
        raise FeedError("invalid_records", f"records {feed.records!r}: {exc}") from None
    records = found if isinstance(found, list) else [found]
    declared = {column["name"]: str(column["type"]) for column in columns} if columns is not None else None
    rows = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise FeedError("invalid_records", f"record {index} is a {_kind(record)}, not a JSON object")
        row = _row(record, index, feed.fields, declared)
        rows.append(row)
    return rows


def _row(record: dict[str, Any], index: int, fields: tuple[tuple[str, str], ...],
         declared: dict[str, str] | None) -> dict[str, Any]:
    if fields:
        picked: dict[str, Any] = {}
        for column, pointer in fields:
            try:
                picked[column] = resolve_pointer(record, pointer)
            except LookupError:
                picked[column] = None  # a missing field is a null; a NOT NULL column refuses it
    elif declared is not None:
        picked = {name: record[name] for name in declared if name in record}
    else:
        bad = next((key for key in record if not COLUMN_NAME_RE.fullmatch(key)), None)
        if bad is not None:
            raise FeedError("invalid_records", f"record {index} has the key {bad[:80]!r}, which is not a column name "
                                               "(^[a-z][a-z0-9_]{0,62}$): declare 'fields' or an output schema")
        picked = dict(record)
    row = {}
    for column, value in picked.items():
        kind = declared.get(column) if declared is not None else None
        if isinstance(value, (dict, list)) and not (isinstance(value, list) and kind is not None
                                                    and kind.startswith("list<")):
            value = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        row[column] = value
    return row


def _kind(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


# -- the allowlist ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AllowEntry:
    """One allowlist entry: a URL prefix (``https://api.example.com/v1/``, its scheme only) or a
    host pattern (``api.example.com``, ``api.example.com:8443``, ``*.example.com``: https only).
    ``*.example.com`` matches the subdomains of example.com, not example.com itself."""

    text: str
    scheme: str
    host: str  # lower case, without a trailing dot; "*.example.com" for a wildcard
    port: int
    path: str  # the path prefix ("/" for a host pattern)

    @property
    def wildcard(self) -> bool:
        return self.host.startswith("*.")

    def names_host(self, host: str) -> bool:
        """Whether this entry names ``host`` itself (not through a wildcard): only then may it
        lead to an internal address."""
        return not self.wildcard and self.host == _host(host)

    def matches(self, url: str) -> bool:
        parts = urlsplit(url)
        if parts.scheme != self.scheme or (parts.port or DEFAULT_PORTS[parts.scheme]) != self.port:
            return False
        host = _host(parts.hostname or "")
        if self.wildcard:
            if not host.endswith(self.host[1:]):  # ".example.com": a subdomain, never the domain itself
                return False
        elif host != self.host:
            return False
        path = parts.path or "/"
        if self.path.endswith("/"):
            return path.startswith(self.path)
        return path == self.path or path.startswith(self.path + "/")


def parse_allowlist(entries: Sequence[str]) -> tuple[AllowEntry, ...]:
    """The entries of ``TRACE_HTTP_INGEST_ALLOWLIST``; ValueError names the first bad one."""
    return tuple(parse_entry(entry) for entry in entries)


def parse_entry(text: str) -> AllowEntry:
    raw = text.strip()
    prefix = "://" in raw
    scheme, _, rest = (raw if prefix else f"https://{raw}").partition("://")
    wildcard = rest.startswith("*.")
    url = f"{scheme}://{rest[2:] if wildcard else rest}"
    if (problem := url_problem(url)) is not None:
        raise ValueError(f"allowlist entry {text!r}: {problem}")
    parts = urlsplit(url)
    if parts.query or (not prefix and parts.path):
        raise ValueError(f"allowlist entry {text!r}: a host pattern has no path, a URL prefix no query")
    host = _host(parts.hostname or "")
    if wildcard and ("." not in host or _is_ip(host)):
        raise ValueError(f"allowlist entry {text!r}: a wildcard covers the subdomains of a domain with a dot "
                         "(*.example.com), never a top-level domain or an address")
    return AllowEntry(raw, parts.scheme, f"*.{host}" if wildcard else host,
                      parts.port or DEFAULT_PORTS[parts.scheme], parts.path or "/")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def allowed_by(url: str, allowlist: Sequence[AllowEntry]) -> AllowEntry | None:
    """The entry that allows ``url`` (one naming its host first), or None."""
    matching = [entry for entry in allowlist if entry.matches(url)]
    host = urlsplit(url).hostname or ""
    return next((entry for entry in matching if entry.names_host(host)), matching[0] if matching else None)


def _host(host: str) -> str:
    return host.lower().rstrip(".")


# -- addresses ----------------------------------------------------------------------------------


def internal_address(address: str) -> str | None:
    """Why ``address`` (an IP a host resolved to) is not on the public internet, or None.

    Anything ``ipaddress`` does not call global counts: loopback, private, link-local (the cloud
    metadata service at 169.254.169.254), carrier-grade NAT, reserved, unspecified, multicast,
    and IPv6 forms that carry such an IPv4 address (mapped ``::ffff:127.0.0.1``, NAT64)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    for attribute, reason in (("is_loopback", "loopback"), ("is_link_local", "link-local (cloud metadata)"),
                              ("is_multicast", "multicast"), ("is_unspecified", "unspecified"),
                              ("is_private", "private"), ("is_reserved", "reserved")):
        if getattr(ip, attribute):
            return reason
    return None if ip.is_global else "not globally routable"


# -- the job (checked with the DAG) -------------------------------------------------------------


def check_job(raw: Mapping[str, Any], parsed: Mapping[str, Any], path: str) -> list[Problem]:
    """What an ``http_ingest`` job needs beside the common keys, given the job as written (``raw``)
    and as parsed so far (``parsed``): a platform runtime, a config, no inputs (seed 003: outside
    data enters at the DAG's entry), one buffered output, and a unique key, so a re-run or a feed
    that repeats itself writes no row twice."""
    problems: list[Problem] = []
    if parsed.get("runtime") not in (None, "platform"):
        problems.append(("invalid_value", f"{path}.runtime", "http_ingest is a platform operator: runtime: platform"))
    if raw.get("config") is None:
        problems.append(("missing_key", f"{path}.config", "http_ingest needs 'config' with at least 'url'"))
    elif isinstance(raw["config"], Mapping):
        problems.extend(check_config(raw["config"], f"{path}.config")[1])
    if raw.get("inputs"):
        problems.append(("invalid_value", f"{path}.inputs",
                         "http_ingest is a DAG entry point: it reads a URL, not other jobs' outputs"))
    written, declared = raw.get("outputs"), parsed.get("output_datasets")  # None: already reported
    if written is None or not isinstance(written, (list, tuple)) or (declared is not None and (
            len(declared) != 1 or declared[0].get("kind") != "buffered")):
        problems.append(("invalid_value", f"{path}.outputs", "http_ingest writes one buffered dataset: "
                         "outputs: [{dataset: <name>, kind: buffered, schema: [...] (optional)}]"))
    if raw.get("unique_key") is None:
        problems.append(("missing_key", f"{path}.unique_key",
                         "http_ingest needs 'unique_key', so a re-run writes no row twice"))
    return problems
