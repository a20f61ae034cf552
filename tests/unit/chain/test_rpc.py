"""The pure parts of workers.chain.rpc: backoff, Retry-After, the token bucket, batch decoding and
the checks on what a node answers. The client against real nodes: tests/integration/chain/test_rpc.py."""

from __future__ import annotations

from email.utils import formatdate

import orjson
import pytest

from workers.chain.rpc import (
    MalformedAnswer,
    RpcClient,
    RpcError,
    TokenBucket,
    backoff_delay,
    check_hash,
    decode_batch,
    encode_batch,
    hex_int,
    redact_url,
    retry_after_s,
)


def test_backoff_grows_exponentially_within_its_jitter_and_cap() -> None:
    low = [backoff_delay(n, base_s=0.5, cap_s=30, rng=lambda: 0.0) for n in range(8)]
    high = [backoff_delay(n, base_s=0.5, cap_s=30, rng=lambda: 1.0) for n in range(8)]
    assert low == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0]
    assert high == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff_delay(10_000, base_s=0.5, cap_s=30, rng=lambda: 1.0) == 30.0  # no overflow


@pytest.mark.parametrize(("header", "expected"), [
    (None, None), ("", None), ("3", 3.0), (" 1.5 ", 1.5), ("-4", 0.0), ("999999", 3600.0), ("soon", None),
    ("nan", None), (formatdate(1_000_010.0, usegmt=True), 10.0), (formatdate(999_000.0, usegmt=True), 0.0),
])
def test_retry_after(header: str | None, expected: float | None) -> None:
    assert retry_after_s(header, now=1_000_000.0) == expected


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_token_bucket_paces_to_its_rate() -> None:
    time = FakeTime()
    bucket = TokenBucket(10, burst=2, clock=time.clock, sleep=time.sleep)
    assert [bucket.take() for _ in range(2)] == [0.0, 0.0]  # the burst
    assert bucket.take() == pytest.approx(0.1)
    assert bucket.take(5) == pytest.approx(0.5)  # a batch larger than the burst runs into debt
    time.now += 10  # idle: refills to the burst, not beyond
    assert bucket.take(2) == 0.0 and bucket.take() == pytest.approx(0.1)
    assert sum(time.slept) == pytest.approx(0.7)
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_batches_encode_ids_and_decode_in_call_order() -> None:
    calls = [("eth_chainId", []), ("eth_getBlockByNumber", ["0x1", False])]
    assert orjson.loads(encode_batch(calls)) == [
        {"jsonrpc": "2.0", "id": 0, "method": "eth_chainId", "params": []},
        {"jsonrpc": "2.0", "id": 1, "method": "eth_getBlockByNumber", "params": ["0x1", False]}]
    shuffled = [{"jsonrpc": "2.0", "id": 1, "result": None}, {"jsonrpc": "2.0", "id": 0, "result": "0x1"}]
    assert [a.get("result") for a in decode_batch(shuffled, 2)] == ["0x1", None]


@pytest.mark.parametrize("body", [
    {"jsonrpc": "2.0", "id": 0, "result": "0x1"},                                 # not an array
    [{"id": 0, "result": 1}],                                                     # one answer missing
    [{"id": 0, "result": 1}, {"id": 0, "result": 2}],                             # an id twice
    [{"id": 0, "result": 1}, {"id": 7, "result": 2}],                             # an id not asked for
    [{"id": 0, "result": 1}, {"id": "1", "result": 2}],                           # a string id
    [{"id": 0, "result": 1}, {"id": 1}],                                          # neither result nor error
    [{"id": 0, "result": 1}, "x"],                                                # not an object
    "garbage",
])
def test_malformed_batches(body: object) -> None:
    with pytest.raises(MalformedAnswer):
        decode_batch(body, 2)


def test_a_batch_refused_as_a_whole_is_an_rpc_error() -> None:
    with pytest.raises(RpcError) as error:
        decode_batch({"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "batch too large"}}, 2)
    assert error.value.code == -32600 and error.value.message == "batch too large"
    assert not isinstance(error.value, MalformedAnswer)


def test_hex_checks() -> None:
    assert hex_int("0x0") == 0 and hex_int("0x1a") == 26
    for bad in ("1a", "0x", "0x-1", "0x1_0", " 0x1", 26, None, "0x" + "f" * 65):
        with pytest.raises(MalformedAnswer):
            hex_int(bad)
    good = "0x" + "Ab" * 32
    assert check_hash(good) == good
    for bad in ("0x" + "ab" * 31, "ab" * 32 + "00", "0x" + "zz" * 32, None):
        with pytest.raises(MalformedAnswer):
            check_hash(bad)


def test_urls_are_redacted_and_checked() -> None:
    assert redact_url("https://eth.example.com/v2/SECRETKEY") == "https://eth.example.com/…"
    assert redact_url("http://127.0.0.1:8545") == "http://127.0.0.1:8545"
    assert redact_url("http://node:8545/?key=SECRET") == "http://node:8545/…"
    client = RpcClient(["https://eth.example.com/v2/SECRETKEY"])  # no request is sent
    assert "SECRET" not in str(client.health())
    for bad in ([], ["ftp://node"], ["node:8545"]):
        with pytest.raises(ValueError):
            RpcClient(bad)
