"""A lean Ethereum JSON-RPC client: keep-alive HTTP (``http.client``), ``orjson``, batches; and a
``newHeads`` subscription over WebSocket (``websockets``' sync client) on a background thread.

Why not web3.py: it costs about ten times the CPU per block (benchmarks/rpc_client.py), and the
follower needs four calls, two of them batched, not a framework.

Failover: ``RpcClient`` takes several URLs and prefers them in the given order. A URL that errs
(refused, timeout, HTTP 5xx or another non-200, a body that is not JSON-RPC) is skipped for a backoff
period (exponential with jitter) and the next one serves the request. A URL rate-limited (HTTP 429,
or JSON-RPC error -32005) is skipped for its ``Retry-After`` or the backoff; when every URL is
rate-limited the call waits for the first to come back (at most ``max_wait_s``). Every few seconds
(``lag_check_s``) the heads of the URLs are compared with one ``eth_blockNumber`` each: a URL more than
``lag_tolerance_blocks`` behind the best is used only when no other answers. When every URL failed
in one pass the call raises ``RpcUnavailable``. ``max_rps`` paces calls with a token bucket
(each call of a batch counts).

Everything a node returns is hostile: bodies are bounded (``max_response_bytes``), ids are matched,
the types this module relies on (hex quantities and hashes, objects, arrays) are checked, and a
malformed answer is an error of that URL (failover), never a crash deeper in the caller. URLs may
hold API keys: messages and ``health()`` show them redacted (scheme, host and port only).

Threads may share a client: each URL keeps a small pool of kept-alive connections (a connection
returns to it only after a complete answer), and ``block_bundles(numbers, parallel=k)`` uses k.
"""

from __future__ import annotations

import http.client
import itertools
import logging
import queue
import random
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import orjson

log = logging.getLogger(__name__)

RATE_LIMITED = -32005
_HASH = re.compile(r"0x[0-9a-fA-F]{64}")
_QUANTITY = re.compile(r"0x[0-9a-fA-F]{1,64}")


class RpcError(Exception):
    """A JSON-RPC error answer (``code`` is the node's, or None when the answer was unusable)."""

    def __init__(self, message: str, code: int | None = None, data: Any = None) -> None:
        super().__init__(f"{message} (code {code})" if code is not None else message)
        self.code = code
        self.message = message
        self.data = data


class RpcUnavailable(RpcError):
    """Every URL failed (or stayed rate-limited past the wait allowed)."""


class MalformedAnswer(RpcError):
    """The node answered something that is not what the JSON-RPC spec promises."""


# ---- pure helpers ----------------------------------------------------------------------------------

def backoff_delay(attempt: int, *, base_s: float = 0.5, cap_s: float = 30.0,
                  rng: Callable[[], float] = random.random) -> float:
    """Exponential backoff with "equal jitter": half of ``base * 2**attempt`` (capped) plus a random
    part of the other half, so retries of many clients spread out yet never come back at once."""
    ceiling = min(cap_s, base_s * (2 ** min(attempt, 30)))
    return ceiling / 2 + rng() * ceiling / 2


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from an HTTP ``Retry-After`` header (delta-seconds or an HTTP date), or None
    when absent or unreadable. Capped at an hour: a hostile header must not park the client."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), 3600.0)


class TokenBucket:
    """At most ``rate`` tokens a second on average, bursts up to ``burst``. ``take(n)`` may run into
    debt (a batch larger than the burst) and then sleeps the debt away, so the rate holds."""

    def __init__(self, rate: float, burst: float | None = None, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise ValueError("a token bucket needs a positive rate")
        self.rate = rate
        self.burst = max(1.0, burst if burst is not None else rate)
        self.clock = clock
        self.sleep = sleep
        self.tokens = self.burst
        self.stamp = clock()
        self.lock = threading.Lock()

    def take(self, n: float = 1.0) -> float:
        """Take ``n`` tokens, sleeping as long as needed; answers the seconds slept."""
        with self.lock:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= n
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait > 0:
            self.sleep(wait)
        return wait


def hex_int(value: Any, what: str = "quantity") -> int:
    """A JSON-RPC quantity ("0x1a") as an int; anything else raises MalformedAnswer."""
    if type(value) is not str or not _QUANTITY.fullmatch(value):
        raise MalformedAnswer(f"{what}: not a hex quantity: {str(value)[:80]!r}")
    return int(value, 16)


def check_hash(value: Any, what: str = "hash") -> str:
    if type(value) is not str or not _HASH.fullmatch(value):
        raise MalformedAnswer(f"{what}: not a 32-byte hex hash: {str(value)[:80]!r}")
    return value


def redact_url(url: str) -> str:
    """scheme://host[:port] only: paths and queries of hosted nodes carry API keys."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    tail = "/…" if (parts.path not in ("", "/") or parts.query) else ""
    return f"{parts.scheme}://{host}{port}{tail}"


def encode_batch(calls: Sequence[tuple[str, list[Any]]]) -> bytes:
    return orjson.dumps([{"jsonrpc": "2.0", "id": i, "method": method, "params": params}
                         for i, (method, params) in enumerate(calls)])


def decode_batch(body: Any, n: int) -> list[dict[str, Any]]:
    """The answers of a batch of ``n`` calls in call order (nodes may answer in any order). A body
    that is not exactly one answer per id raises MalformedAnswer."""
    if type(body) is not list:
        if type(body) is dict and isinstance(body.get("error"), dict):  # the batch as a whole was refused
            raise _error_of(body["error"])
        raise MalformedAnswer(f"a batch answer must be an array, got {type(body).__name__}")
    answers: list[dict[str, Any] | None] = [None] * n
    for answer in body:
        index = answer.get("id") if type(answer) is dict else None
        if type(index) is not int or not 0 <= index < n or answers[index] is not None:
            raise MalformedAnswer(f"a batch answer with an unexpected id: {str(index)[:40]!r}")
        if "result" not in answer and not isinstance(answer.get("error"), dict):
            raise MalformedAnswer(f"answer {index} has neither result nor error")
        answers[index] = answer
    if any(answer is None for answer in answers):
        raise MalformedAnswer(f"{answers.count(None)} of {n} calls unanswered")
    return answers  # type: ignore[return-value]


def _error_of(error: dict[str, Any]) -> RpcError:
    code = error.get("code")
    message = error.get("message")
    return RpcError(str(message)[:500] if message is not None else "error", code if type(code) is int else None,
                    error.get("data"))


# ---- endpoints -------------------------------------------------------------------------------------

_IDLE_PER_URL = 8


class _EndpointFailed(Exception):
    def __init__(self, reason: str, *, rate_limited: bool = False, wait_s: float | None = None) -> None:
        super().__init__(reason)
        self.rate_limited = rate_limited
        self.wait_s = wait_s


@dataclass
class _Endpoint:
    url: str
    index: int
    timeout_s: float
    scheme: str = ""
    host: str = ""
    port: int = 0
    path: str = "/"
    idle: list[http.client.HTTPConnection] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    failures: int = 0
    skip_until: float = 0.0
    rate_limited_until: float = 0.0
    last_error: str | None = None
    last_head: int | None = None
    latency_ms: float | None = None
    lagging: bool = False

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"an RPC URL must be http(s)://host[:port][/path]: {redact_url(self.url)}")
        self.scheme, self.host = parts.scheme, parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    @property
    def name(self) -> str:
        return redact_url(self.url)

    def take(self) -> tuple[http.client.HTTPConnection, bool]:
        """A kept-alive connection (and True) when one is idle, else a new one (and False)."""
        with self.lock:
            if self.idle:
                return self.idle.pop(), True
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout_s,
                                               context=ssl.create_default_context()), False
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s), False

    def give(self, conn: http.client.HTTPConnection) -> None:
        """Back to the pool after a complete answer (at most _IDLE_PER_URL are kept)."""
        with self.lock:
            if len(self.idle) < _IDLE_PER_URL:
                self.idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self.lock:
            idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()


class RpcClient:
    """JSON-RPC over HTTP to one of several URLs (see the module docstring for failover)."""

    def __init__(self, urls: Sequence[str], *, timeout_s: float = 5.0, lag_tolerance_blocks: int = 3,
                 max_rps: float | None = None, max_response_bytes: int = 128 * 1024 * 1024,
                 max_batch_blocks: int = 25, max_batch_calls: int = 200, lag_check_s: float = 3.0,
                 backoff_base_s: float = 0.5, backoff_cap_s: float = 30.0, max_wait_s: float = 10.0) -> None:
        if not urls:
            raise ValueError("an RPC client needs at least one URL")
        self.endpoints = [_Endpoint(url, i, timeout_s) for i, url in enumerate(urls)]
        self.lag_tolerance_blocks = lag_tolerance_blocks
        self.bucket = TokenBucket(max_rps) if max_rps else None
        self.max_response_bytes = max_response_bytes
        self.max_batch_blocks = max(1, max_batch_blocks)
        self.max_batch_calls = max(2, max_batch_calls)
        self.lag_check_s = lag_check_s
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.max_wait_s = max_wait_s
        self._lag_checked_at = float("-inf")
        self._ids = itertools.count(1)

    # ---- public calls ------------------------------------------------------------------------------

    def call(self, method: str, params: list[Any]) -> Any:
        """One call; an error answer raises RpcError (RpcUnavailable when no URL answered)."""
        request_id = next(self._ids)
        body = orjson.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        answer = self._send(body, 1, single_id=request_id)
        if "error" in answer:
            raise _error_of(answer["error"])
        return answer["result"]

    def batch(self, calls: Sequence[tuple[str, list[Any]]]) -> list[Any]:
        """Several calls in ONE HTTP request; results in call order. An error entry raises RpcError."""
        if not calls:
            return []
        answers = self._send(encode_batch(calls), len(calls))
        for i, answer in enumerate(answers):
            if "error" in answer:
                error = _error_of(answer["error"])
                raise RpcError(f"{calls[i][0]} (call {i} of the batch): {error.message}", error.code, error.data)
        return [answer["result"] for answer in answers]

    def block_number(self) -> int:
        return hex_int(self.call("eth_blockNumber", []), "eth_blockNumber")

    def block_bundle(self, block_hash: str, *, null_retries: int = 3,
                     null_retry_delay_s: float = 0.05) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """The block (full transactions) and its receipts in ONE batched request; None when the node
        still answers null after ``null_retries`` brief retries (an orphaned or not yet indexed block)."""
        check_hash(block_hash, "block hash")
        for attempt in range(null_retries + 1):
            block, receipts = self.batch([("eth_getBlockByHash", [block_hash, True]),
                                          ("eth_getBlockReceipts", [block_hash])])
            if block is not None and receipts is not None:
                return _checked_bundle(block, receipts, block_hash=block_hash)
            if attempt < null_retries:
                time.sleep(null_retry_delay_s * (2 ** attempt))
        return None

    def block_bundles(self, numbers: Sequence[int], *, parallel: int = 1,
                      ) -> list[tuple[dict[str, Any], list[dict[str, Any]]] | None]:
        """Bundles by number (catch-up, backfill), in the order asked, ``max_batch_blocks`` blocks a
        request and up to ``parallel`` requests at once (a node serves full blocks slowly: anvil takes
        ~23 ms for 50 transactions, so a backfill gains from asking in parallel); None for a block the
        node does not have. Receipts that belong to another block than the one answered (a reorg
        between the two calls) are fetched again by the block's hash."""
        size = self.max_batch_blocks
        chunks = [numbers[start:start + size] for start in range(0, len(numbers), size)]
        if parallel > 1 and len(chunks) > 1:
            with ThreadPoolExecutor(min(parallel, len(chunks)), thread_name_prefix="rpc") as pool:
                parts = list(pool.map(self._bundles_chunk, chunks))
        else:
            parts = [self._bundles_chunk(chunk) for chunk in chunks]
        return [bundle for part in parts for bundle in part]

    def _bundles_chunk(self, chunk: Sequence[int]) -> list[tuple[dict[str, Any], list[dict[str, Any]]] | None]:
        calls: list[tuple[str, list[Any]]] = []
        for number in chunk:
            calls += [("eth_getBlockByNumber", [_tag(number), True]), ("eth_getBlockReceipts", [_tag(number)])]
        results = self.batch(calls)
        bundles: list[tuple[dict[str, Any], list[dict[str, Any]]] | None] = []
        for i, number in enumerate(chunk):
            block, receipts = results[2 * i], results[2 * i + 1]
            if block is None or receipts is None:
                bundles.append(None)
                continue
            if type(block) is not dict:
                raise MalformedAnswer(f"block {number}: not an object")
            if hex_int(block.get("number"), "block number") != number:
                raise MalformedAnswer(f"asked for block {number}, got {str(block.get('number'))[:20]}")
            block_hash = check_hash(block.get("hash"), "block hash")
            if type(receipts) is list and any(type(r) is dict and r.get("blockHash") not in (None, block_hash)
                                              for r in receipts):
                receipts = self.call("eth_getBlockReceipts", [block_hash])
                if receipts is None:
                    bundles.append(None)
                    continue
            bundles.append(_checked_bundle(block, receipts, block_hash=block_hash))
        return bundles

    def headers(self, numbers: Sequence[int]) -> list[dict[str, Any] | None]:
        """Block headers (``eth_getBlockByNumber(n, false)``) batched: where the coordinator looks for
        a fork point. None for a height the node does not have."""
        headers: list[dict[str, Any] | None] = []
        for start in range(0, len(numbers), self.max_batch_calls):
            chunk = numbers[start:start + self.max_batch_calls]
            for number, header in zip(chunk, self.batch([("eth_getBlockByNumber", [_tag(n), False]) for n in chunk]),
                                      strict=True):
                if header is not None:
                    if type(header) is not dict:
                        raise MalformedAnswer(f"header {number}: not an object")
                    check_hash(header.get("hash"), "block hash")
                    check_hash(header.get("parentHash"), "parent hash")
                    if hex_int(header.get("number"), "block number") != number:
                        raise MalformedAnswer(f"asked for header {number}, got {str(header.get('number'))[:20]}")
                headers.append(header)
        return headers

    def health(self) -> list[dict[str, Any]]:
        """Per URL (redacted): whether it answered last time, its last error, head, latency, lag."""
        now = time.monotonic()
        return [{"url": ep.name, "ok": ep.failures == 0 and ep.rate_limited_until <= now,
                 "last_error": ep.last_error, "last_head": ep.last_head,
                 "latency_ms": None if ep.latency_ms is None else round(ep.latency_ms, 2), "lagging": ep.lagging}
                for ep in self.endpoints]

    def close(self) -> None:
        for ep in self.endpoints:
            ep.close()

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- failover ----------------------------------------------------------------------------------

    def _send(self, body: bytes, n_calls: int, single_id: int | None = None) -> Any:
        """Send ``body`` to the best URL that answers; the decoded answer (an object for one call,
        the answers in call order for a batch)."""
        if self.bucket is not None:
            self.bucket.take(n_calls)
        self._check_lag()
        deadline = time.monotonic() + self.max_wait_s
        while True:
            errors: list[str] = []
            for ep in self._candidates():
                try:
                    raw = self._post(ep, body)
                    entries = decode_batch(raw, n_calls) if single_id is None else [_decode_single(raw, single_id)]
                    if any(isinstance(e.get("error"), dict) and e["error"].get("code") == RATE_LIMITED
                           for e in entries):
                        raise _EndpointFailed("rate limited (-32005)", rate_limited=True)
                except MalformedAnswer as exc:
                    self._failed(ep, _EndpointFailed(f"malformed answer: {exc.message}"))
                    errors.append(f"{ep.name}: malformed answer: {exc.message}")
                    continue
                except _EndpointFailed as exc:
                    self._failed(ep, exc)
                    errors.append(f"{ep.name}: {exc}")
                    continue
                except RpcError as exc:  # the batch refused as a whole
                    if exc.code != RATE_LIMITED:
                        raise
                    self._failed(ep, _EndpointFailed("rate limited (-32005)", rate_limited=True))
                    errors.append(f"{ep.name}: rate limited (-32005)")
                    continue
                ep.failures, ep.last_error = 0, None
                return entries if single_id is None else entries[0]
            now = time.monotonic()
            limited = [ep.rate_limited_until for ep in self.endpoints if ep.rate_limited_until > now]
            if limited and min(limited) <= deadline:
                time.sleep(max(0.0, min(limited) - now))  # no one else answered: wait for the first rate-limited
                continue
            raise RpcUnavailable("no RPC URL answered: " + "; ".join(errors[-len(self.endpoints):]))

    def _candidates(self) -> list[_Endpoint]:
        """URLs to try, best first: available and in step, then available but lagging; when none is
        available (all in backoff), the ones not rate-limited, soonest back first (a last-resort probe:
        a node that was down may be back; a rate-limited one has said when to come back)."""
        now = time.monotonic()
        available = [ep for ep in self.endpoints if ep.skip_until <= now and ep.rate_limited_until <= now]
        if available:
            return [ep for ep in available if not ep.lagging] + [ep for ep in available if ep.lagging]
        return sorted((ep for ep in self.endpoints if ep.rate_limited_until <= now), key=lambda ep: ep.skip_until)

    def _failed(self, ep: _Endpoint, exc: _EndpointFailed) -> None:
        now = time.monotonic()
        ep.last_error = str(exc)[:500]
        if exc.rate_limited:
            wait = exc.wait_s if exc.wait_s is not None else backoff_delay(
                ep.failures, base_s=self.backoff_base_s, cap_s=self.backoff_cap_s)
            ep.rate_limited_until = now + wait
        else:
            ep.skip_until = now + backoff_delay(ep.failures, base_s=self.backoff_base_s, cap_s=self.backoff_cap_s)
        ep.failures += 1
        log.warning("rpc: %s failed (%s); %d URL(s) configured", ep.name, ep.last_error, len(self.endpoints))

    def _check_lag(self) -> None:
        """At most every ``lag_check_s``: one eth_blockNumber per available URL; mark the ones more
        than ``lag_tolerance_blocks`` behind the best. Only worth it with several URLs."""
        now = time.monotonic()
        if len(self.endpoints) < 2 or now - self._lag_checked_at < self.lag_check_s:
            return
        self._lag_checked_at = now
        body = orjson.dumps({"jsonrpc": "2.0", "id": 0, "method": "eth_blockNumber", "params": []})
        for ep in self.endpoints:
            if ep.skip_until > now or ep.rate_limited_until > now:
                continue
            try:
                answer = _decode_single(self._post(ep, body), 0)
                if "error" in answer:
                    raise _EndpointFailed(f"eth_blockNumber: {_error_of(answer['error']).message}")
                ep.last_head = hex_int(answer["result"], "eth_blockNumber")
            except MalformedAnswer as exc:
                self._failed(ep, _EndpointFailed(f"malformed answer: {exc.message}"))
            except _EndpointFailed as exc:
                self._failed(ep, exc)
        heads = [ep.last_head for ep in self.endpoints if ep.last_head is not None and ep.skip_until <= now]
        best = max(heads, default=None)
        for ep in self.endpoints:
            behind = None if best is None or ep.last_head is None else best - ep.last_head
            ep.lagging = behind is not None and behind > self.lag_tolerance_blocks

    # ---- one HTTP request --------------------------------------------------------------------------

    def _post(self, ep: _Endpoint, body: bytes) -> Any:
        """POST ``body`` on one of the URL's kept-alive connections; the parsed JSON. A pooled
        connection the server closed while idle is retried once on a fresh one before the URL counts
        as failed. A connection goes back to the pool only after a complete answer."""
        for attempt in (0, 1):
            conn, reused = ep.take()
            started = time.perf_counter()
            try:
                conn.request("POST", ep.path, body, {"Content-Type": "application/json", "Accept": "application/json"})
                response = conn.getresponse()
                raw = self._read(response)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                conn.close()
                if reused and attempt == 0:
                    continue
                raise _EndpointFailed(f"connection lost: {exc.__class__.__name__}") from exc
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise _EndpointFailed(f"{exc.__class__.__name__}: {str(exc)[:200]}") from exc
            except _EndpointFailed:
                conn.close()
                raise
            elapsed_ms = (time.perf_counter() - started) * 1000
            ep.latency_ms = elapsed_ms if ep.latency_ms is None else 0.8 * ep.latency_ms + 0.2 * elapsed_ms
            if response.will_close:
                conn.close()
            else:
                ep.give(conn)
            if response.status == 429:
                raise _EndpointFailed("rate limited (HTTP 429)", rate_limited=True,
                                      wait_s=retry_after_s(response.getheader("Retry-After")))
            if response.status != 200:
                raise _EndpointFailed(f"HTTP {response.status}")
            try:
                return orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise _EndpointFailed(f"not JSON: {str(exc)[:120]}") from exc
        raise AssertionError("unreachable")

    def _read(self, response: http.client.HTTPResponse) -> bytes:
        length = response.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > self.max_response_bytes:
            response.close()
            raise _EndpointFailed(f"answer of {length} bytes exceeds {self.max_response_bytes}")
        raw = response.read(self.max_response_bytes + 1)
        if len(raw) > self.max_response_bytes:
            response.close()
            raise _EndpointFailed(f"answer exceeds {self.max_response_bytes} bytes")
        return raw


def _tag(number: int) -> str:
    if type(number) is not int or number < 0:
        raise ValueError(f"not a block number: {number!r}")
    return hex(number)


def _decode_single(body: Any, expected_id: int) -> dict[str, Any]:
    if type(body) is dict and body.get("id") is None and isinstance(body.get("error"), dict):
        raise _error_of(body["error"])  # refused before it was read (a parse error, a rate limit)
    if type(body) is not dict or body.get("id") != expected_id:
        raise MalformedAnswer("an answer that is not a JSON-RPC object with the request's id")
    if "result" not in body and not isinstance(body.get("error"), dict):
        raise MalformedAnswer("an answer with neither result nor error")
    return body


def _checked_bundle(block: Any, receipts: Any, *, block_hash: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The shape ``tracecore.chain.cryo.tables_from_rpc`` relies on, checked at the door."""
    if type(block) is not dict or type(receipts) is not list:
        raise MalformedAnswer("a block must be an object and its receipts an array")
    if str(block.get("hash")).lower() != block_hash.lower():
        raise MalformedAnswer(f"asked for block {block_hash}, got {str(block.get('hash'))[:80]}")
    hex_int(block.get("number"), "block number")
    check_hash(block.get("parentHash"), "parent hash")
    transactions = block.get("transactions")
    if type(transactions) is not list or any(type(tx) is not dict for tx in transactions):
        raise MalformedAnswer("a block's transactions must be full transaction objects")
    if len(receipts) != len(transactions) or any(type(r) is not dict for r in receipts):
        raise MalformedAnswer(f"{len(transactions)} transactions but {len(receipts)} receipts")
    return block, receipts


# ---- the head subscription -------------------------------------------------------------------------

class HeadSubscription:
    """``eth_subscribe("newHeads")`` on a background thread; ``get()`` hands out the heads in order.

    The connection is reopened with backoff when it drops (a node restart, a network cut): heads sent
    meanwhile are lost, which is why the follower also polls ``eth_blockNumber``. Heads that are not
    objects with a hash and a number are dropped. At most ``max_pending`` heads wait; older ones are
    discarded first (a consumer that far behind catches up by number anyway)."""

    def __init__(self, ws_url: str, *, open_timeout_s: float = 5.0, max_message_bytes: int = 1024 * 1024,
                 max_pending: int = 10_000, backoff_base_s: float = 0.2, backoff_cap_s: float = 10.0) -> None:
        if urllib.parse.urlsplit(ws_url).scheme not in ("ws", "wss"):
            raise ValueError(f"a head subscription needs a ws:// or wss:// URL: {redact_url(ws_url)}")
        self.ws_url = ws_url
        self.open_timeout_s = open_timeout_s
        self.max_message_bytes = max_message_bytes
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.heads: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=max_pending)
        self.connected = threading.Event()
        self.connects = 0
        self.last_error: str | None = None
        self._closed = threading.Event()
        self._ws: Any = None
        self._thread = threading.Thread(target=self._run, name=f"heads {redact_url(ws_url)}", daemon=True)
        self._thread.start()

    def get(self, timeout_s: float) -> dict[str, Any] | None:
        """The next head (the ``result`` of the newHeads notification), or None after ``timeout_s``."""
        try:
            return self.heads.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def close(self) -> None:
        self._closed.set()
        ws = self._ws
        if ws is not None:
            try:
                ws.close()
            except Exception:  # closing a broken connection: nothing left to do
                pass
        self._thread.join(timeout=10)

    def __enter__(self) -> HeadSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        from websockets.exceptions import WebSocketException
        from websockets.sync.client import connect

        failures = 0
        while not self._closed.is_set():
            try:
                with connect(self.ws_url, open_timeout=self.open_timeout_s, max_size=self.max_message_bytes,
                             proxy=None, compression=None) as ws:
                    self._ws = ws
                    subscription = self._subscribe(ws)
                    self.connects += 1
                    failures = 0
                    self.connected.set()
                    self._receive(ws, subscription)
            except Exception as exc:  # the thread must outlive anything a node sends or does
                if not isinstance(exc, (OSError, WebSocketException, RpcError, ValueError)):
                    log.exception("heads: unexpected error on %s", redact_url(self.ws_url))
                self.last_error = f"{exc.__class__.__name__}: {str(exc)[:200]}"
                if not self._closed.is_set():
                    log.info("heads: %s lost (%s); reconnecting", redact_url(self.ws_url), self.last_error)
            finally:
                self._ws = None
                self.connected.clear()
            if self._closed.wait(backoff_delay(failures, base_s=self.backoff_base_s, cap_s=self.backoff_cap_s)):
                break
            failures += 1

    def _subscribe(self, ws: Any) -> str:
        ws.send(orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_subscribe", "params": ["newHeads"]}),
                text=True)
        deadline = time.monotonic() + self.open_timeout_s
        while True:
            message = orjson.loads(ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if type(message) is dict and message.get("id") == 1:
                if isinstance(message.get("error"), dict):
                    raise _error_of(message["error"])
                subscription = message.get("result")
                if type(subscription) is not str or not subscription:
                    raise MalformedAnswer("eth_subscribe answered no subscription id")
                return subscription

    def _receive(self, ws: Any, subscription: str) -> None:
        while not self._closed.is_set():
            try:
                raw = ws.recv(timeout=0.5)
            except TimeoutError:
                continue
            try:
                message = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            params = message.get("params") if type(message) is dict else None
            if type(params) is not dict or params.get("subscription") != subscription:
                continue
            head = params.get("result")
            try:
                if type(head) is not dict:
                    raise MalformedAnswer("a head that is not an object")
                check_hash(head.get("hash"), "head hash")
                hex_int(head.get("number"), "head number")
            except MalformedAnswer:
                continue
            while True:
                try:
                    self.heads.put_nowait(head)
                    break
                except queue.Full:
                    try:
                        self.heads.get_nowait()  # the oldest goes
                    except queue.Empty:
                        pass
