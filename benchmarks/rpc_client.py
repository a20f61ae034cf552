"""Client CPU per block: Trace's JSON-RPC client against web3.py (or, without it, requests + json).

What a follower does per head, on blocks of ``--txs`` transactions (each emitting two logs) served
by a local anvil: fetch the block with its transactions and its receipts by hash. Measured as the
client process's CPU time (``time.process_time``: anvil's work is another process's), per block,
over ``--rounds`` passes over ``--blocks`` blocks:

- trace: ``RpcClient.block_bundle`` (one batched request, orjson), and the same plus
  ``tracecore.chain.cryo.tables_from_rpc`` (the rows the follower commits);
- web3: ``w3.eth.get_block(h, full_transactions=True)`` and ``w3.eth.get_block_receipts(h)`` in one
  ``batch_requests()``, run in a scratch virtualenv outside the project (web3 is never a project
  dependency): ``--web3-python`` names its interpreter, otherwise one is made under the temporary
  directory with ``pip install web3``; when that fails the web3 line says so and is skipped;
- requests + json: the same batched request with ``requests`` and the standard ``json`` (a plain
  lean baseline, always measured).

Ratios printed: baseline CPU / Trace CPU (higher is better for Trace).

    python benchmarks/rpc_client.py [--blocks 40] [--txs 50] [--rounds 5] [--web3-python PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.integration.chain.conftest import AnvilNode, ensure_anvil
from tracecore.chain.cryo import tables_from_rpc
from workers.chain.rpc import RpcClient

WEB3_LOOP = r"""
import json, sys, time
from web3 import Web3
url, hashes, rounds = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
w3 = Web3(Web3.HTTPProvider(url))
def one(h):
    with w3.batch_requests() as batch:
        batch.add(w3.eth.get_block(h, full_transactions=True))
        batch.add(w3.eth.get_block_receipts(h))
        block, receipts = batch.execute()
    assert len(block["transactions"]) == len(receipts)
for h in hashes[:3]:
    one(h)  # warm-up: connection, lazy imports
started = time.process_time()
for _ in range(rounds):
    for h in hashes:
        one(h)
print(json.dumps({"cpu_s": time.process_time() - started, "web3": __import__("web3").__version__}))
"""


def make_chain(node: AnvilNode, blocks: int, txs: int) -> list[str]:
    """``blocks`` blocks of ``txs`` emitter calls each; their hashes."""
    node.deploy_emitter()
    hashes = []
    for _ in range(blocks):
        node.send_txs(txs, one_block=True, wait=False)
        block = node.block("latest")
        assert block is not None and len(block["transactions"]) == txs, "a block lost transactions"
        hashes.append(str(block["hash"]))
    return hashes


def measure(call: Callable[[str], None], hashes: list[str], rounds: int) -> float:
    """CPU seconds per block of ``call(hash)`` over ``rounds`` passes (after a short warm-up)."""
    for h in hashes[:3]:
        call(h)
    started = time.process_time()
    for _ in range(rounds):
        for h in hashes:
            call(h)
    return (time.process_time() - started) / (rounds * len(hashes))


def web3_python(given: str | None) -> tuple[str | None, str]:
    """The interpreter of a scratch virtualenv that has web3, or (None, why not)."""
    if given:
        return given, "given"
    venv = Path(tempfile.gettempdir()) / "trace-bench-web3-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
        if made.returncode != 0:
            return None, f"no virtualenv: {made.stderr.strip()[-200:]}"
    if subprocess.run([str(python), "-c", "import web3"], capture_output=True).returncode != 0:
        print("installing web3 into a scratch virtualenv outside the project ...", file=sys.stderr)
        installed = subprocess.run([str(python), "-m", "pip", "install", "-q", "web3"], capture_output=True,
                                   text=True, timeout=900)
        if installed.returncode != 0:
            return None, f"pip install web3 failed: {installed.stderr.strip()[-300:]}"
    return str(python), str(venv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--txs", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--web3-python", default=os.environ.get("TRACE_BENCH_WEB3_PYTHON"))
    args = parser.parse_args()

    node = AnvilNode(ensure_anvil(), Path(tempfile.mkdtemp(prefix="trace-bench-anvil-")), "anvil", None, [])
    node.start()
    try:
        hashes = make_chain(node, args.blocks, args.txs)
        client = RpcClient([node.rpc_url])
        session = requests.Session()

        def trace_fetch(h: str) -> None:
            assert client.block_bundle(h) is not None

        def trace_rows(h: str) -> None:
            bundle = client.block_bundle(h)
            assert bundle is not None
            tables_from_rpc([bundle], 31337)

        def plain_fetch(h: str) -> None:
            body = json.dumps([{"jsonrpc": "2.0", "id": 0, "method": "eth_getBlockByHash", "params": [h, True]},
                               {"jsonrpc": "2.0", "id": 1, "method": "eth_getBlockReceipts", "params": [h]}])
            answers = json.loads(session.post(node.rpc_url, data=body,
                                              headers={"Content-Type": "application/json"}).content)
            assert len(answers) == 2

        # interleaved, twice, best of both (the machine is shared)
        figures: dict[str, list[float]] = {"trace": [], "trace+rows": [], "requests+json": []}
        for _ in range(2):
            figures["trace"].append(measure(trace_fetch, hashes, args.rounds))
            figures["trace+rows"].append(measure(trace_rows, hashes, args.rounds))
            figures["requests+json"].append(measure(plain_fetch, hashes, args.rounds))
        best = {name: min(values) for name, values in figures.items()}

        chunk = client.block_bundles(list(range(2, 2 + len(hashes))))
        bundles = [b for b in chunk if b is not None]
        started = time.process_time()
        for _ in range(args.rounds):
            tables_from_rpc(bundles, 31337)
        rows_per_block = (time.process_time() - started) / (args.rounds * len(bundles))

        python, where = web3_python(args.web3_python)
        web3_note = ""
        if python is not None:
            done = subprocess.run([python, "-c", WEB3_LOOP, node.rpc_url, json.dumps(hashes), str(args.rounds)],
                                  capture_output=True, text=True, timeout=900)
            if done.returncode == 0:
                result = json.loads(done.stdout.strip().splitlines()[-1])
                best["web3"] = result["cpu_s"] / (args.rounds * len(hashes))
                web3_note = f"web3 {result['web3']} ({where})"
            else:
                web3_note = f"web3 failed: {done.stderr.strip()[-300:]}"
        else:
            web3_note = f"web3 not measured: {where}"
        client.close()
        session.close()
    finally:
        node.stop()

    print(f"client CPU per block: {len(hashes)} blocks x {args.txs} txs (2 logs each), {args.rounds} rounds; "
          f"{web3_note}")
    for name, seconds in best.items():
        print(f"  {name:14s} {seconds * 1e6:9.0f} us")
    print(f"  tables_from_rpc alone, {len(bundles)} blocks at once: {rows_per_block * 1e6:.0f} us per block")
    for baseline in ("web3", "requests+json"):
        if baseline in best:
            print(f"ratio {baseline} / trace (fetch): {best[baseline] / best['trace']:.1f}x; "
                  f"{baseline} / trace (fetch + cryo rows): {best[baseline] / best['trace+rows']:.1f}x")


if __name__ == "__main__":
    main()
