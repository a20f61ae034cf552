"""A real chain node for the chain tests: ``anvil`` (foundry), started per test on a free port.

``anvil`` is a factory: ``node = anvil(block_time=0.2)`` starts one node (several may run at once,
e.g. two RPC URLs for failover) and every node a test started is killed at its end, whatever
happened. The binary comes from ``deploy/ensure-anvil.sh`` (which installs it on a fresh clone), never
from a path assumed here. A node that does not start fails the test: nothing is skipped for want of it.

``AnvilNode.rpc`` speaks plain JSON-RPC over ``urllib``, on purpose independent of
``workers.chain.rpc``: the tests of that client must not check it against itself.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

# anvil's first default account (mnemonic "test test ... junk"): funded and unlocked, so
# eth_sendTransaction needs no signature.
DEV_ACCOUNT = "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266"
DEV_ACCOUNTS = (DEV_ACCOUNT, "0x70997970c51812dc3a010c7d01b50e0d17dc79c8", "0x3c44cdddb6a900fa2b585dd299e03d12fa4293bc")

# The emitter: a contract written directly in EVM bytecode (no compiler on this machine, and none
# needed). Every call emits two logs:
#   log A, LOG4: topic0 = EMITTER_TOPIC (a fixed tag), topic1 = the caller, topic2 = the block number,
#                topic3 = the calldata's length; data = the calldata itself;
#   log B, LOG0: no topics, empty data (cryo's topic0..topic3 are then all null, data is b"").
# So one call yields logs with all four topics, with none, with data of any length, and two logs
# per transaction (log_index and transaction_index both matter).
EMITTER_TOPIC = "0x" + b"trace.emitter.Ping".ljust(32, b"\0").hex()
_RUNTIME = bytes.fromhex(
    "36"            # CALLDATASIZE                  [n]
    "6000"          # PUSH1 0 (calldata offset)     [0, n]
    "6000"          # PUSH1 0 (memory offset)       [0, 0, n]
    "37"            # CALLDATACOPY: memory[0:n] = calldata
    "36"            # CALLDATASIZE   -> topic3
    "43"            # NUMBER         -> topic2
    "33"            # CALLER         -> topic1
    "7f" + EMITTER_TOPIC[2:] +  # PUSH32 the tag -> topic0
    "36"            # CALLDATASIZE   -> data length
    "6000"          # PUSH1 0        -> data offset in memory
    "a4"            # LOG4(offset 0, length n, topic0, topic1, topic2, topic3)
    "6000"          # PUSH1 0        -> length 0
    "6000"          # PUSH1 0        -> offset 0
    "a0"            # LOG0(offset 0, length 0)
    "00"            # STOP
)
# The constructor copies the runtime (which follows it in the creation code) to memory and returns
# it: PUSH1 len, PUSH1 start, PUSH1 0, CODECOPY(dest 0, start, len), PUSH1 len, PUSH1 0, RETURN(0, len).
_INIT_LENGTH = 12
_INIT = bytes([0x60, len(_RUNTIME), 0x60, _INIT_LENGTH, 0x60, 0x00, 0x39, 0x60, len(_RUNTIME), 0x60, 0x00, 0xF3])
assert len(_INIT) == _INIT_LENGTH
EMITTER_CREATION_CODE = "0x" + (_INIT + _RUNTIME).hex()
EMITTER_RUNTIME_CODE = "0x" + _RUNTIME.hex()


class RpcFailure(AssertionError):
    """The node answered a JSON-RPC error (the test's own call was wrong, or the node broke)."""


def ensure_anvil() -> str:
    """The anvil binary, as ``deploy/ensure-anvil.sh`` installs and names it."""
    done = subprocess.run([str(ROOT / "deploy" / "ensure-anvil.sh")], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"deploy/ensure-anvil.sh failed: {done.stderr.strip()[-2000:]}", pytrace=False)
    for line in done.stdout.splitlines():
        if line.startswith("ensure-anvil: "):
            return line.removeprefix("ensure-anvil: ").strip()
    pytest.fail(f"deploy/ensure-anvil.sh named no binary: {done.stdout!r}", pytrace=False)


def free_port() -> int:
    """A port nothing listens on now (the kernel's choice; another process could take it before
    anvil binds, in which case anvil fails to start and the start is retried on a new port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class AnvilNode:
    """One anvil process on 127.0.0.1:``port``; ``restart()`` keeps the port (not the chain: anvil
    keeps its state in memory, so a restarted node starts again from block 0)."""

    def __init__(self, binary: str, log_dir: Path, name: str, block_time: float | None,
                 args: Sequence[str]) -> None:
        self.binary = binary
        self.log_path = log_dir / f"{name}.log"
        self.block_time = block_time
        self.args = list(args)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.emitter: str | None = None
        self._ids = 0

    @property
    def rpc_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    # ---- process -------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        command = [self.binary, "--host", "127.0.0.1", "--port", str(self.port)]
        if self.block_time is not None:
            command += ["--block-time", repr(self.block_time)]
        if "--order" not in self.args:
            # Blocks in sending order. anvil 1.7.1's default ("fees") drops a transaction from a block
            # mined by evm_mine when it pays more than an earlier one of the same sender that it waits
            # for (seen with a legacy transaction after an EIP-1559 one): a test's transaction vanished.
            command += ["--order", "fifo"]
        command += self.args
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"anvil exited with {self.process.returncode}: {self._log_tail()}")
            try:
                self.rpc("eth_chainId", [])
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"anvil did not answer within {timeout} s: {self._log_tail()}")

    def stop(self) -> None:
        """Kill the node (SIGKILL to its process group) and wait for it: the port is free after."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        self.emitter = None

    def restart(self) -> None:
        """Stop, then start on the same port (a fresh chain: see the class docstring)."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    # ---- JSON-RPC ------------------------------------------------------------------------------

    def rpc(self, method: str, params: list[Any] | None = None) -> Any:
        """One plain JSON-RPC call over HTTP; an error answer raises ``RpcFailure``."""
        self._ids += 1
        body = json.dumps({"jsonrpc": "2.0", "id": self._ids, "method": method, "params": params or []}).encode()
        request = urllib.request.Request(self.rpc_url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
        if "error" in answer:
            raise RpcFailure(f"{method}: {answer['error']}")
        return answer["result"]

    def block_number(self) -> int:
        return int(self.rpc("eth_blockNumber"), 16)

    def block(self, number: int | str, full: bool = False) -> dict[str, Any] | None:
        tag = hex(number) if isinstance(number, int) else number
        result: dict[str, Any] | None = self.rpc("eth_getBlockByNumber", [tag, full])
        return result

    def mine(self, n: int = 1) -> int:
        """Mine ``n`` blocks now (with or without a block time); answers the new head's number."""
        self.rpc("anvil_mine", [hex(n)])
        return self.block_number()

    # ---- transactions --------------------------------------------------------------------------

    def deploy_emitter(self) -> str:
        """Deploy the hand-written emitter (see EMITTER_CREATION_CODE); answers its address."""
        tx_hash = self.rpc("eth_sendTransaction", [{"from": DEV_ACCOUNT, "data": EMITTER_CREATION_CODE,
                                                    "gas": hex(200_000)}])
        receipt = self.wait_receipt(tx_hash)
        address = receipt["contractAddress"]
        assert self.rpc("eth_getCode", [address, "latest"]) == EMITTER_RUNTIME_CODE, "the emitter did not deploy"
        self.emitter = address
        return str(address)

    def tx_request(self, i: int, to: str | None = None, *, legacy: bool = False, value: int = 0) -> dict[str, Any]:
        """The ``i``-th transaction of a batch: senders rotate over three dev accounts, calldata varies
        in length (0 to 40 bytes, so data and topic3 vary), legacy or EIP-1559 pricing."""
        target = to or self.emitter
        if target is None:
            target = self.deploy_emitter()
        calldata = bytes((i * 7 + k) % 256 for k in range(i % 41))
        request: dict[str, Any] = {"from": DEV_ACCOUNTS[i % len(DEV_ACCOUNTS)], "to": target,
                                   "data": "0x" + calldata.hex(), "value": hex(value), "gas": hex(100_000)}
        if legacy:
            request["gasPrice"] = hex(3_000_000_000)
        return request

    def send_txs(self, n: int, to: str | None = None, *, one_block: bool = False, legacy_every: int = 0,
                 value: int = 0, wait: bool = True) -> list[str]:
        """Send ``n`` transactions (to the emitter unless ``to`` names another address; it is deployed
        first if needed) with ``eth_sendTransaction`` from anvil's unlocked dev accounts.

        ``one_block``: all in one block (automine is paused, the block mined, automine restored); on a
        node with a block time they are sent back to back and mostly share the next block.
        ``legacy_every``: every k-th one is a legacy (gasPrice) transaction, the others EIP-1559.
        ``wait``: return once every transaction has a receipt (on a node with a block time, that is
        after the next block). Answers the transaction hashes in sending order."""
        if to is None and self.emitter is None:
            self.deploy_emitter()
        one_block = one_block and self.block_time is None  # on an interval node they share the next block anyway
        if one_block:
            self.rpc("evm_setAutomine", [False])
        try:
            hashes = [self.rpc("eth_sendTransaction", [self.tx_request(
                i, to, legacy=bool(legacy_every) and i % legacy_every == 0, value=value)]) for i in range(n)]
            if one_block:
                self.rpc("evm_mine", [])
        finally:
            if one_block:
                self.rpc("evm_setAutomine", [True])
        if wait:
            for tx_hash in hashes:
                self.wait_receipt(tx_hash)
        return [str(h) for h in hashes]

    def wait_receipt(self, tx_hash: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            receipt: dict[str, Any] | None = self.rpc("eth_getTransactionReceipt", [tx_hash])
            if receipt is not None:
                return receipt
            time.sleep(0.02)
        raise AssertionError(f"no receipt for {tx_hash} after {timeout} s")

    # ---- reorgs --------------------------------------------------------------------------------

    def reorg(self, depth: int, txs: int = 2) -> list[str]:
        """``anvil_reorg``: replace the last ``depth`` blocks by as many new ones, carrying ``txs`` fresh
        transactions (spread over the new blocks), so every replaced block gets a new hash. Answers
        the orphaned block hashes, oldest first."""
        head = self.block_number()
        assert depth <= head, f"cannot reorg {depth} blocks of a chain of {head}"
        orphaned = [str(self.rpc("eth_getBlockByNumber", [hex(n), False])["hash"])
                    for n in range(head - depth + 1, head + 1)]
        fresh = [[self.tx_request(1000 + i, self.emitter or DEV_ACCOUNTS[1]), i % depth] for i in range(txs)]
        self.rpc("anvil_reorg", [depth, fresh])
        return orphaned

    def rollback(self, depth: int) -> list[str]:
        """``anvil_rollback``: drop the last ``depth`` blocks (the head goes back ``depth`` blocks).
        Answers the dropped block hashes, oldest first."""
        head = self.block_number()
        dropped = [str(self.rpc("eth_getBlockByNumber", [hex(n), False])["hash"])
                   for n in range(head - depth + 1, head + 1)]
        self.rpc("anvil_rollback", [depth])
        return dropped


AnvilFactory = Callable[..., AnvilNode]


@pytest.fixture(scope="session")
def anvil_binary() -> str:
    return ensure_anvil()


@pytest.fixture
def anvil(anvil_binary: str, tmp_path: Path) -> Iterator[AnvilFactory]:
    """``anvil(block_time=None, *extra_args) -> AnvilNode``: a started node on a free port.

    ``block_time`` (seconds, fractional allowed) makes anvil mine on an interval; without it anvil
    mines one block per transaction (and ``mine(n)`` on demand). Every node is killed at the end."""
    started: list[AnvilNode] = []

    def start(block_time: float | None = None, *args: str) -> AnvilNode:
        for attempt in range(3):
            node = AnvilNode(anvil_binary, tmp_path, f"anvil-{len(started)}-{attempt}", block_time, args)
            started.append(node)
            try:
                node.start()
                return node
            except RuntimeError:
                node.stop()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    yield start
    for node in started:
        node.stop()
