"""workers.chain.rpc against real anvil nodes (and, for failover, stand-ins for misbehaving nodes).

The expected values come from the fixture's own plain JSON-RPC (``AnvilNode.rpc``), never from the
client under test. Waits are bounded polls, so a slow machine makes a test slower, not wrong.
"""

from __future__ import annotations

import http.server
import json
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from tests.conftest import wait_for
from tests.integration.chain.conftest import AnvilFactory, AnvilNode, free_port
from workers.chain.rpc import HeadSubscription, MalformedAnswer, RpcClient, RpcError, RpcUnavailable


@dataclass
class Misbehaving:
    """A stand-in for a misbehaving node: a local HTTP server that answers what ``answer`` says for
    the first ``bad_requests`` requests (HTTP 500, 429 with Retry-After, a JSON-RPC -32005 error, a
    body that is not JSON) and afterwards forwards requests to a real anvil. Not a mock of anvil:
    it reproduces what hosted RPC providers do under load, which anvil never does."""

    answer: str
    upstream: str
    bad_requests: int = 10**9
    retry_after: str = "30"
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def misbehaving() -> Iterator[Callable[..., Misbehaving]]:
    started: list[Misbehaving] = []

    def start(answer: str, upstream: str, bad_requests: int = 10**9, retry_after: str = "30") -> Misbehaving:
        stand_in = Misbehaving(answer, upstream, bad_requests, retry_after)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with stand_in.lock:
                    stand_in.requests += 1
                    bad = stand_in.requests <= stand_in.bad_requests
                if not bad:
                    request = urllib.request.Request(stand_in.upstream, data=body,
                                                     headers={"Content-Type": "application/json"})
                    with urllib.request.urlopen(request, timeout=10) as response:
                        self._reply(200, response.read())
                elif stand_in.answer == "500":
                    self._reply(500, b"internal error")
                elif stand_in.answer == "429":
                    self._reply(429, b"slow down", {"Retry-After": stand_in.retry_after})
                elif stand_in.answer == "-32005-whole":  # the batch refused as a whole
                    refusal = {"jsonrpc": "2.0", "id": None, "error": {"code": -32005, "message": "limit exceeded"}}
                    self._reply(200, json.dumps(refusal).encode())
                elif stand_in.answer == "-32005":
                    payload = json.loads(body)
                    ids = [c["id"] for c in payload] if isinstance(payload, list) else [payload["id"]]
                    errors = [{"jsonrpc": "2.0", "id": i, "error": {"code": -32005, "message": "limit exceeded"}}
                              for i in ids]
                    self._reply(200, json.dumps(errors if isinstance(payload, list) else errors[0]).encode())
                else:  # "garbage"
                    self._reply(200, b"<html>gateway</html>")

            def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        stand_in.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=stand_in.server.serve_forever, daemon=True).start()
        started.append(stand_in)
        return stand_in

    yield start
    for stand_in in started:
        assert stand_in.server is not None
        stand_in.server.shutdown()
        stand_in.server.server_close()


@pytest.fixture
def chain(anvil: AnvilFactory) -> AnvilNode:
    """A node with a few blocks that carry transactions and logs (legacy and EIP-1559)."""
    node = anvil()
    node.deploy_emitter()
    node.send_txs(4, one_block=True, legacy_every=2)
    node.send_txs(3)
    node.mine(2)
    return node


def test_batch_answers_in_call_order(chain: AnvilNode) -> None:
    with RpcClient([chain.rpc_url]) as client:
        calls = [("eth_getBlockByNumber", [hex(n), False]) for n in (3, 1, 2)] + [("eth_chainId", []),
                                                                                  ("eth_blockNumber", [])]
        results = client.batch(calls)
        assert results == [chain.rpc(method, params) for method, params in calls]
        assert client.batch([]) == []
        assert client.block_number() == chain.block_number()
        with pytest.raises(RpcError) as error:
            client.batch([("eth_chainId", []), ("no_such_method", [])])
        assert "call 1" in str(error.value) and error.value.code is not None


def test_block_bundle_equals_separate_calls(chain: AnvilNode) -> None:
    head = chain.block_number()
    with RpcClient([chain.rpc_url]) as client:
        for number in range(head + 1):
            block = chain.rpc("eth_getBlockByNumber", [hex(number), True])
            expected = (chain.rpc("eth_getBlockByHash", [block["hash"], True]),
                        chain.rpc("eth_getBlockReceipts", [block["hash"]]))
            assert client.block_bundle(block["hash"]) == expected
        by_number = client.block_bundles(list(range(head + 1)))
        assert by_number == [client.block_bundle(chain.rpc("eth_getBlockByNumber", [hex(n), False])["hash"])
                             for n in range(head + 1)]
        assert sum(len(receipt["logs"]) for bundle in by_number if bundle for receipt in bundle[1]) == 14
        assert client.block_bundles([head + 5]) == [None]
        headers = client.headers([0, head, head + 1])
        assert headers[:2] == [chain.rpc("eth_getBlockByNumber", [hex(n), False]) for n in (0, head)]
        assert headers[2] is None


def test_block_bundles_chunked_to_the_batch_size_and_in_parallel(chain: AnvilNode) -> None:
    head = chain.block_number()
    with RpcClient([chain.rpc_url], max_batch_blocks=2, max_batch_calls=3) as client:
        sequential = client.block_bundles(list(range(head + 1)))
        assert [b[0]["number"] for b in sequential if b] == [hex(n) for n in range(head + 1)]
        assert client.block_bundles(list(range(head + 1)), parallel=3) == sequential
        assert 1 <= len(client.endpoints[0].idle) <= 3  # at most one kept-alive connection per thread, pooled
        assert [h["number"] for h in client.headers(list(range(head + 1))) if h] == [hex(n) for n in range(head + 1)]


def test_unknown_hash_is_none(chain: AnvilNode) -> None:
    with RpcClient([chain.rpc_url]) as client:
        assert client.block_bundle("0x" + "ab" * 32, null_retries=2, null_retry_delay_s=0.01) is None
        with pytest.raises(MalformedAnswer):
            client.block_bundle("0x1234")


def test_bounded_answers(chain: AnvilNode) -> None:
    with RpcClient([chain.rpc_url], max_response_bytes=200) as client:
        with pytest.raises(RpcUnavailable, match="exceeds"):
            client.batch([("eth_getBlockByNumber", [hex(2), True])])


def test_failover_when_the_first_url_is_dead(chain: AnvilNode) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with RpcClient([dead, chain.rpc_url]) as client:
        assert client.block_number() == chain.block_number()
        block = chain.block(2)
        assert block is not None and client.block_bundle(block["hash"]) is not None
        health = client.health()
        assert [h["ok"] for h in health] == [False, True]
        assert "Connection" in (health[0]["last_error"] or "") and health[1]["last_error"] is None
    with RpcClient([dead]) as alone:
        with pytest.raises(RpcUnavailable):
            alone.block_number()


@pytest.mark.parametrize("answer", ["500", "429", "-32005", "garbage"])
def test_failover_when_the_first_url_misbehaves(chain: AnvilNode, misbehaving: Callable[..., Misbehaving],
                                                answer: str) -> None:
    bad = misbehaving(answer, chain.rpc_url)
    with RpcClient([bad.url, chain.rpc_url], backoff_base_s=30) as client:
        assert client.block_number() == chain.block_number()
        assert client.batch([("eth_chainId", [])]) == ["0x7a69"]
        health = client.health()
        assert health[0]["ok"] is False and health[1]["ok"] is True
        assert bad.requests == 1  # skipped afterwards, for its backoff or its Retry-After


@pytest.mark.parametrize("answer", ["429", "-32005", "-32005-whole"])
def test_waits_out_a_rate_limit_when_no_other_url_answers(chain: AnvilNode, misbehaving: Callable[..., Misbehaving],
                                                          answer: str) -> None:
    limited = misbehaving(answer, chain.rpc_url, bad_requests=2, retry_after="0.1")
    with RpcClient([limited.url], backoff_base_s=0.05, max_wait_s=10) as client:
        assert client.batch([("eth_blockNumber", [])]) == [hex(chain.block_number())]
        assert limited.requests == 3
        limited.requests = 0  # and a single call, refused the same way twice
        assert client.block_number() == chain.block_number()
        assert limited.requests == 3


def test_lagging_url_is_not_preferred(anvil: AnvilFactory) -> None:
    behind, ahead = anvil(), anvil()
    ahead.mine(10)
    with RpcClient([behind.rpc_url, ahead.rpc_url], lag_tolerance_blocks=3, lag_check_s=0) as client:
        assert client.block_number() == 10
        assert [h["lagging"] for h in client.health()] == [True, False]
        behind.mine(20)
        assert client.block_number() == 20
        assert [h["lagging"] for h in client.health()] == [False, True]
        ahead.mine(11)  # 21 against 20: within the tolerance, the first URL is preferred again
        assert client.block_number() == 20
        assert [h["lagging"] for h in client.health()] == [False, False]


def test_subscription_delivers_heads_and_survives_a_restart(anvil: AnvilFactory) -> None:
    node = anvil(0.2)
    with HeadSubscription(node.ws_url, backoff_base_s=0.05, backoff_cap_s=0.5) as heads:
        seen = [wait_for(lambda: heads.get(1.0), timeout=30, message="a head") for _ in range(3)]
        numbers = [int(head["number"], 16) for head in seen]  # type: ignore[index]
        assert numbers == sorted(numbers) and len(set(numbers)) == 3
        block = node.block(numbers[0])
        assert block is not None and block["hash"] == seen[0]["hash"]  # type: ignore[index]
        node.restart()  # same port, a fresh chain from block 0
        wait_for(lambda: heads.connects >= 2, timeout=30, message="the subscription to reconnect")
        while heads.get(0) is not None:  # heads of the old chain still queued
            pass
        after = wait_for(lambda: heads.get(1.0), timeout=30, message="a head after the restart")
        restarted = node.block(int(after["number"], 16))  # type: ignore[index]
        assert restarted is not None and restarted["hash"] == after["hash"]  # type: ignore[index]
    assert not heads._thread.is_alive()


def test_subscription_ignores_hostile_messages() -> None:
    """A stand-in for a hostile node's WebSocket (anvil never sends these): the first connection
    refuses eth_subscribe; the second acknowledges it, then sends garbage, heads of another
    subscription, malformed heads, one valid head and a message over the size bound (which drops
    the connection); the third sends one more valid head. Only the two valid heads come out."""
    from websockets.sync.server import ServerConnection, serve

    good = [{"hash": "0x" + f"{n:064x}", "number": hex(n), "parentHash": "0x" + "00" * 32} for n in (7, 8)]
    connections: list[int] = []

    def handler(ws: ServerConnection) -> None:
        connections.append(1)
        request = json.loads(ws.recv())
        assert request["method"] == "eth_subscribe" and request["params"] == ["newHeads"]
        if len(connections) == 1:
            ws.send(json.dumps({"jsonrpc": "2.0", "id": request["id"], "error": {"code": -32601, "message": "no"}}))
            return

        def note(subscription: str, head: object) -> str:
            return json.dumps({"jsonrpc": "2.0", "method": "eth_subscription",
                               "params": {"subscription": subscription, "result": head}})

        ws.send(json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": "0xs1"}))
        if len(connections) == 2:
            for message in ["not json", "[]", note("0xother", good[1]), note("0xs1", "0x12"),
                            note("0xs1", {"hash": "0x12", "number": "0x1"}),
                            note("0xs1", {"hash": good[0]["hash"], "number": 5}), note("0xs1", good[0]),
                            note("0xs1", {"junk": "x" * 3000})]:
                ws.send(message)
        else:
            ws.send(note("0xs1", good[1]))
        try:
            ws.recv(timeout=30)  # until the client goes
        except Exception:
            pass

    with serve(handler, "127.0.0.1", 0, compression=None) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.socket.getsockname()[1]
        with HeadSubscription(f"ws://127.0.0.1:{port}", max_message_bytes=2000, backoff_base_s=0.05,
                              backoff_cap_s=0.2) as heads:
            first = wait_for(lambda: heads.get(1.0), timeout=30, message="the valid head")
            second = wait_for(lambda: heads.get(1.0), timeout=30, message="the head after the reconnect")
            assert [first, second] == good
            assert heads.get(0.2) is None
            assert len(connections) == 3 and heads.connects == 2
        server.shutdown()
