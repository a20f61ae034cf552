"""The bundles in examples/ (seed 000's use cases) run through the real Docker sandbox, as uploaded: the folder's
runtime files only, with the libraries they import coming from the runtime images' vetted set."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.workers.sandbox.test_docker import CACHE, CARGO, Sandbox, assert_ok, normalize_modes
from tests.integration.workers.sandbox.test_vetted_libraries import SLOW, TRANSFER_TOPIC

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[4] / "examples"




def bundle_of(example: str, files: tuple[str, ...], tmp_path: Path) -> Path:
    bundle = tmp_path / example
    bundle.mkdir()
    for name in files:
        shutil.copy(EXAMPLES / example / name, bundle / name)
    normalize_modes(bundle)
    return bundle


def test_python_alert_with_pandas(sandbox: Sandbox, tmp_path: Path) -> None:
    rows = ([{"address": "0xaa", "value": v} for v in (10.0, 10.0, 10.0, 10.0)]          # std 0
            + [{"address": "0xbb", "value": v} for v in (2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0)])  # std 2.138
    event = {"config": {"rows": rows, "threshold": 2.0}}
    outcome, _ = sandbox.run(bundle_of("python-alert", ("trace.py",), tmp_path), event=event, limits=SLOW)
    assert_ok(outcome)
    assert outcome.response == {"rows": [{"address": "0xbb", "std": round((32 / 7) ** 0.5, 6), "samples": 8,
                                          "threshold": 2.0}]}


def _word(hex_digits: str) -> str:
    return "0x" + hex_digits.rjust(64, "0")


def test_node_erc20_transfers_with_ethers(sandbox: Sandbox, tmp_path: Path) -> None:
    a, b = "1" * 40, "3" * 40
    logs = [
        {"topics": [TRANSFER_TOPIC, _word(a), _word(b)], "data": _word(format(1_500_250_000, "x")),
         "transactionHash": "0x" + "ab" * 32, "logIndex": 7},                          # 1500.25: kept
        {"topics": [TRANSFER_TOPIC, _word(b), _word(a)], "data": _word(format(999_000_000, "x")),
         "transactionHash": "0x" + "cd" * 32, "logIndex": 8},                          # 999: below 1000
    ]
    event = {"config": {"logs": logs, "decimals": 6, "symbol": "USDC", "min_amount": "1000"}}
    outcome, _ = sandbox.run(bundle_of("node-erc20", ("trace.js",), tmp_path), runtime="nodejs", event=event,
                             limits=SLOW)
    assert_ok(outcome)
    assert outcome.response == {"rows": [{"tx": "0x" + "ab" * 32, "log_index": 7, "from": "0x" + a, "to": "0x" + b,
                                          "amount": "1500.25 USDC", "raw": "1500250000"}]}


def test_rust_scan_bootstrap(sandbox: Sandbox, tmp_path: Path) -> None:
    """`col("value").gt(threshold)` in a std-only Rust `provided` bootstrap, built here with cargo --offline."""
    if CARGO is None:
        pytest.skip("no cargo on this machine to build examples/rust-scan")
    crate = EXAMPLES / "rust-scan"
    digest = hashlib.sha256()
    for path in sorted(p for p in crate.rglob("*") if p.is_file() and "target" not in p.parts):
        digest.update(path.relative_to(crate).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    target = CACHE / f"rust-scan-{digest.hexdigest()[:16]}"
    binary = target / "release" / "bootstrap"
    if not binary.is_file():
        done = subprocess.run([CARGO, "build", "--release", "--offline"], cwd=crate, capture_output=True, text=True,
                              timeout=600, check=False, env={**os.environ, "CARGO_TARGET_DIR": str(target)})
        assert done.returncode == 0 and binary.is_file(), f"cargo build failed:\n{done.stdout}\n{done.stderr}"
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copy(binary, bundle / "bootstrap")
    normalize_modes(bundle, executable=("bootstrap",))
    rows = [{"address": "0xaa", "value": 5}, {"address": "0xbb", "value": 12.5, "tag": "big"},
            {"address": "0xcc", "value": 10}, {"address": "0xdd", "value": 1e3}]
    outcome, _ = sandbox.run(bundle, runtime="provided", handler="scan", event={"config": {"rows": rows,
                                                                                        "threshold": 10}})
    assert_ok(outcome)
    assert outcome.response == {"rows": [rows[1], rows[3]]}

    outcome, _ = sandbox.run(bundle, runtime="provided", handler="scan", event={"config": {"rows": rows}})
    assert outcome.exit_reason == "error"
    assert outcome.error_message == "config.threshold must be a number"
