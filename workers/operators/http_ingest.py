"""The ``http_ingest`` operator: fetch a JSON feed from an allowlisted URL into a buffered dataset.

A platform operator (trusted code, in the worker, no sandbox) and the off-chain half of
ingestion (seed 003): a job at the DAG's entry, run by any trigger (a schedule, usually), whose
rows go through the same fenced buffer-publish as a UDF's (``publish.publish_rows``), so the
unique key makes a re-run write nothing twice, a version is made only when rows are new, and
that version's event fires the reactive jobs downstream.

The server at the other end is hostile until proven otherwise. Every attempt:

- matches the URL (and every redirect's) against ``TRACE_HTTP_INGEST_ALLOWLIST``
  (``url_not_allowed``), resolves the host once and refuses internal addresses unless the entry
  names that host itself (``address_not_allowed``), then connects to the address it checked, so
  a DNS answer that changes between the check and the connection changes nothing;
- bounds the whole exchange by ``TRACE_HTTP_INGEST_TIMEOUT``: a watchdog shuts the socket at the
  deadline, so a server that drips one byte a second is cut like a silent one (``fetch_timeout``);
- reads at most ``TRACE_HTTP_INGEST_MAX_BYTES`` (``response_too_large``), identity encoding only
  (no decompression bomb: ``unsupported_encoding``), JSON content types only (``not_json``);
- decodes the body with the platform's strict JSON rules (``invalid_json``, ``too_deep``,
  ``number_too_large``, ``invalid_string``) and turns records into rows (``invalid_records``).

Each refusal is an attempt that failed with that exit reason, never an exception that escapes the
worker. Network faults, timeouts, 429 and 5xx answers are retried by the job's policy; a refusal
of what the server sent is not (the next scheduled run asks again).
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

from tracecore.dags import http_feed
from tracecore.data import datasets, publish
from tracecore.db.engine import db
from tracecore.exceptions import StaleFence, TraceError
from tracecore.execution import tokens
from tracecore.execution.lease import Failure
from tracecore.infra import strict_json
from tracecore.infra.storage import object_store

from . import AttemptFailed, OperatorContext, OperatorResult

MAX_REDIRECTS = 3
REDIRECTS = (301, 302, 303, 307, 308)
_READ_CHUNK = 64 << 10
_USER_AGENT = "trace-http-ingest/1"
Resolver = Callable[[str, int], Sequence[str]]


class FetchRefused(Exception):
    """The fetch failed or was refused; ``reason`` becomes the attempt's exit reason."""

    def __init__(self, reason: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.reason, self.message, self.retryable = reason, message, retryable


@dataclass(frozen=True)
class Fetched:
    url: str  # the URL that answered, after redirects
    status: int
    body: bytes


def run(context: OperatorContext) -> OperatorResult:
    lease, settings = context.lease, context.settings
    feed, problems = http_feed.check_config(lease.config)
    if feed is None:
        _, path, message = problems[0]
        raise AttemptFailed(Failure("invalid_config", "InvalidConfig", f"{path}: {message}", retryable=False))
    try:
        allowlist = http_feed.parse_allowlist(settings.http_ingest_allowlist)
    except ValueError as exc:
        raise AttemptFailed(Failure("invalid_allowlist", "InvalidAllowlist", f"TRACE_HTTP_INGEST_ALLOWLIST: {exc}",
                                    retryable=False)) from None
    try:
        fetched = fetch(feed.url, allowlist, headers=feed.headers, max_bytes=settings.http_ingest_max_bytes,
                        timeout=settings.http_ingest_timeout)
    except FetchRefused as exc:
        raise AttemptFailed(Failure(exc.reason, "FetchRefused", exc.message, retryable=exc.retryable)) from None
    try:
        document = strict_json.loads(fetched.body, what="the feed's answer")
    except TraceError as exc:
        raise AttemptFailed(Failure(exc.code, type(exc).__name__, exc.message, retryable=False)) from None
    dataset = _output(lease.org_id, lease.job_spec)
    try:
        rows = http_feed.rows_of(document, feed, dataset.schema)
    except http_feed.FeedError as exc:
        raise AttemptFailed(Failure(exc.reason, "FeedError", exc.message, retryable=False)) from None
    finally:
        db.session.rollback()  # _output's read: hold nothing while publishing
    published = _publish(lease, settings, rows)
    return OperatorResult({"url": _without_query(fetched.url), "status": fetched.status, "bytes": len(fetched.body),
                           "records": len(rows), **published.to_json()})


def _output(org_id: Any, job_spec: dict[str, Any]) -> datasets.Dataset:
    """The job's one output dataset as stored now (its schema may have been adopted since the DAG)."""
    declared: list[dict[str, Any]] = list(job_spec.get("output_datasets") or [])
    if len(declared) != 1:
        raise AttemptFailed(Failure("invalid_config", "InvalidConfig", "http_ingest writes exactly one output dataset",
                                    retryable=False))
    return datasets.get_dataset(org_id, declared[0]["dataset"])


def _publish(lease: Any, settings: Any, rows: list[dict[str, Any]]) -> publish.PublishResult:
    """Rows through the fenced buffer-publish, as the ``udf`` operator publishes a handler's rows."""
    capability = tokens.for_lease(lease, settings, inputs=[])
    try:
        return publish.publish_rows(capability, None, rows, store=object_store(settings))
    except StaleFence as exc:
        raise AttemptFailed(Failure("stale_fence", "StaleFence", exc.message, retryable=False)) from None
    except TraceError as exc:
        details = f" {json.dumps(exc.details, default=str)[:2000]}" if exc.details else ""
        raise AttemptFailed(Failure("publish_error", type(exc).__name__, f"{exc.code}: {exc.message}{details}",
                                    retryable=exc.http_status >= 500)) from None


def _without_query(url: str) -> str:
    """What the attempt records of a URL: no query string, which is where API keys travel."""
    parts = urlsplit(url)
    return parts._replace(query="", fragment="").geturl()


# -- the fetch ---------------------------------------------------------------------------------


def fetch(url: str, allowlist: Sequence[http_feed.AllowEntry], *, headers: Sequence[tuple[str, str]] = (),
          max_bytes: int, timeout: float, resolve: Resolver | None = None) -> Fetched:
    """GET ``url`` under the rules of the module docstring; follows up to ``MAX_REDIRECTS``
    redirects, each checked like the first URL. ``resolve(host, port)`` answers the host's
    addresses (default: the system's resolver)."""
    deadline = time.monotonic() + timeout
    for _ in range(MAX_REDIRECTS + 1):
        status, location, body = _get(url, allowlist, headers, max_bytes, deadline, resolve or _system_resolve)
        if status not in REDIRECTS:
            return Fetched(url, status, body)
        if location is None:
            raise FetchRefused("fetch_failed", f"{_without_query(url)} answered HTTP {status} without a Location")
        target = urljoin(url, location)
        if (problem := http_feed.url_problem(target)) is not None:
            raise FetchRefused("url_not_allowed", f"{_without_query(url)} redirects to {location[:200]!r}: {problem}")
        if http_feed.allowed_by(target, allowlist) is None:
            raise FetchRefused("url_not_allowed", f"{_without_query(url)} redirects to {_without_query(target)}, "
                                                  "which is not on the installation's allowlist")
        url = target
    raise FetchRefused("too_many_redirects", f"more than {MAX_REDIRECTS} redirects")


def _get(url: str, allowlist: Sequence[http_feed.AllowEntry], headers: Sequence[tuple[str, str]], max_bytes: int,
         deadline: float, resolve: Resolver) -> tuple[int, str | None, bytes]:
    """One request: (status, Location of a redirect, body of a 2xx)."""
    entry = http_feed.allowed_by(url, allowlist)
    shown = _without_query(url)
    if entry is None:
        raise FetchRefused("url_not_allowed", f"{shown} is not on the installation's allowlist "
                                              "(TRACE_HTTP_INGEST_ALLOWLIST)")
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or http_feed.DEFAULT_PORTS[parts.scheme]
    addresses = _addresses(host, port, entry, resolve, deadline)
    connection = _connection(parts.scheme, host, port, addresses[0], _remaining(deadline))
    watchdog = threading.Timer(_remaining(deadline), _cut, (connection,))
    watchdog.daemon = True
    watchdog.start()
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection.request("GET", target, headers={"Accept": "application/json", "Accept-Encoding": "identity",
                                                   "User-Agent": _USER_AGENT, **dict(headers)})
        response = connection.getresponse()
        _remaining(deadline)  # the watchdog may have cut the headers short: what was read is not an answer
        if response.status in REDIRECTS:
            return response.status, response.getheader("Location"), b""
        _check_answer(response, shown, max_bytes)
        return response.status, None, _read(response, max_bytes, deadline)
    except FetchRefused:
        raise
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if time.monotonic() >= deadline:
            raise FetchRefused("fetch_timeout", f"{shown} did not answer in full within the fetch timeout",
                               retryable=True) from None
        raise FetchRefused("fetch_failed", f"{shown}: {type(exc).__name__}: {str(exc)[:300]}",
                           retryable=True) from None
    finally:
        watchdog.cancel()
        connection.close()


def _addresses(host: str, port: int, entry: http_feed.AllowEntry, resolve: Resolver, deadline: float) -> list[str]:
    """The host's addresses, every one checked: one internal address refuses the host (a name
    that answers both public and internal addresses is exactly a rebinding attempt)."""
    addresses = _resolved(host, port, resolve, deadline)
    if not addresses:
        raise FetchRefused("fetch_failed", f"{host!r} resolves to no address", retryable=True)
    if not entry.names_host(host):
        for address in addresses:
            reason = http_feed.internal_address(address)
            if reason is not None:
                raise FetchRefused("address_not_allowed", f"{host!r} resolves to {address}, a {reason} address; "
                                   f"the allowlist entry {entry.text!r} does not name this host itself")
    return addresses


def _resolved(host: str, port: int, resolve: Resolver, deadline: float) -> list[str]:
    """``resolve(host, port)`` within the deadline: the system's resolver has no timeout of its own
    that Trace sets, so it runs in a thread that is abandoned (it ends with the lookup) when late."""
    outcome: list[list[str] | BaseException] = []

    def lookup() -> None:
        try:
            outcome.append(list(resolve(host, port)))
        except BaseException as exc:  # handed to the caller's thread, which decides
            outcome.append(exc)

    thread = threading.Thread(target=lookup, name="http-ingest-resolve", daemon=True)
    thread.start()
    thread.join(_remaining(deadline))
    if not outcome:
        raise FetchRefused("fetch_timeout", f"resolving {host!r} took longer than the fetch timeout", retryable=True)
    found = outcome[0]
    if isinstance(found, (OSError, UnicodeError)):
        raise FetchRefused("fetch_failed", f"cannot resolve {host!r}: {found}", retryable=True)
    if isinstance(found, BaseException):
        raise found
    return found


def _system_resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchRefused("fetch_timeout", "no complete answer within the fetch timeout", retryable=True)
    return left


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the address that was checked, whatever the name resolves to now."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """TLS to the checked address, the certificate verified for the URL's host name (SNI too)."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        raw = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)  # type: ignore[attr-defined]


def _connection(scheme: str, host: str, port: int, address: str, timeout: float) -> http.client.HTTPConnection:
    kind = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
    return kind(host, port, address, timeout)


def _cut(connection: http.client.HTTPConnection) -> None:
    """The watchdog: at the deadline, shut the socket so whatever read is blocked on it ends."""
    sock = connection.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _check_answer(response: http.client.HTTPResponse, shown: str, max_bytes: int) -> None:
    if not 200 <= response.status < 300:
        raise FetchRefused("http_status", f"{shown} answered HTTP {response.status}",
                           retryable=response.status == 429 or response.status >= 500)
    content_type = (response.getheader("Content-Type") or "").split(";", 1)[0].strip().lower()
    if content_type != "application/json" and not (content_type.startswith("application/")
                                                   and content_type.endswith("+json")):
        raise FetchRefused("not_json", f"{shown} answered {content_type[:100] or 'no Content-Type'!r}, "
                                       "not application/json")
    encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
    if encoding != "identity":
        raise FetchRefused("unsupported_encoding", f"{shown} answered with Content-Encoding {encoding[:50]!r}; "
                                                   "only identity is read")
    length = response.getheader("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > max_bytes:
        raise FetchRefused("response_too_large", f"{shown} announces {int(length)} bytes; the cap is {max_bytes}")


def _read(response: http.client.HTTPResponse, max_bytes: int, deadline: float) -> bytes:
    """The body, one socket read at a time (``read1``), so the deadline is checked between reads
    however slowly the bytes come; never more than ``max_bytes``."""
    chunks: list[bytes] = []
    size = 0
    while True:
        _remaining(deadline)
        chunk = response.read1(_READ_CHUNK)
        if not chunk:
            if time.monotonic() >= deadline:  # the watchdog shut the socket: an end, but not the answer's
                raise FetchRefused("fetch_timeout", "the answer did not arrive in full within the fetch timeout",
                                   retryable=True)
            if response.length:  # read1 does not complain when fewer bytes came than announced
                raise FetchRefused("fetch_failed", f"the connection closed {response.length} bytes short of the "
                                                   "announced Content-Length", retryable=True)
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise FetchRefused("response_too_large", f"the answer exceeds {max_bytes} bytes")
        chunks.append(chunk)
