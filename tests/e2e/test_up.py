"""`trace up` on an empty TRACE_HOME, driven as a user would: start it, use the CLI, stop it."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import requests

from tests.conftest import ROOT, wait_for
from tracecore.infra.embedded import free_port


def _trace_processes(home: Path) -> list[psutil.Process]:
    """Every process that belongs to this Trace home: children, postgres, redis."""
    found = []
    for process in psutil.process_iter(["cmdline", "environ"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
            environ = process.info["environ"] or {}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if str(home) in cmdline or environ.get("TRACE_HOME") == str(home):
            found.append(process)
    return found


def _cli(home: Path, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("TRACE_")}
    env.update({"TRACE_HOME": str(home), "TRACE_PORT": str(port), "PYTHONWARNINGS": "ignore"})
    return subprocess.run([sys.executable, "-m", "web.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_up_serves_runs_jobs_and_stops_cleanly(tmp_path: Path, anvil: Any) -> None:
    home = Path(f"/tmp/trace-up-{os.getpid()}")  # short: the PostgreSQL socket path has a length limit
    port = free_port()
    node = anvil(block_time=None)
    node.deploy_emitter()
    node.send_txs(4)
    node.mine(1100)  # history below the follower's start (1000), final under a 12-block depth
    chain = {"name": "anvil", "chain_id": 31337, "rpc_urls": [node.rpc_url], "ws_url": node.ws_url,
             "finality": {"depth": 12}, "start_block": 1000}
    env = {key: value for key, value in os.environ.items() if not key.startswith("TRACE_")}
    env.update({"TRACE_HOME": str(home), "TRACE_PORT": str(port), "PYTHONWARNINGS": "ignore",
                "TRACE_CHAINS": json.dumps([chain])})
    log = tmp_path / "up.log"
    with open(log, "wb") as output:
        up = subprocess.Popen([sys.executable, "-m", "web.cli", "up"], env=env, cwd=ROOT, stdout=output,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "Trace is up" in log.read_text(errors="replace") or up.poll() is not None, timeout=120,
                 message="trace up to start")
        assert up.poll() is None, log.read_text(errors="replace")
        health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert health.status_code == 200 and health.json()["checks"] == {"database": True, "broker": True}

        token_file = home / "admin-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        me = requests.get(f"http://127.0.0.1:{port}/v1/me", timeout=5,
                          headers={"Authorization": f"Bearer {token_file.read_text().strip()}"}).json()
        assert me["org"]["name"] == "default" and me["role"] == "admin" and me["user"]["installation_admin"]

        # The README's example, through the CLI.
        dag_file = tmp_path / "hello.yaml"
        dag_file.write_text("- name: hello\n  runtime: platform\n  operator: noop\n"
                            "- name: after_hello\n  runtime: platform\n  operator: noop\n"
                            "  trigger: {any_of: [hello]}\n")
        applied = _cli(home, port, "apply", str(dag_file))
        assert applied.returncode == 0 and "dag hello version 1" in applied.stdout, applied.stderr
        ran = _cli(home, port, "run", "hello", "--wait")
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert "succeeded" in ran.stdout
        listed = _cli(home, port, "runs", "--job", "hello")
        assert listed.returncode == 0 and "succeeded" in listed.stdout
        # The composite trigger fired once, from the worker that ran hello; the ledger says so.
        deadline = time.monotonic() + 30
        while "fired" not in (firings := _cli(home, port, "firings", "after_hello")).stdout:
            assert time.monotonic() < deadline, firings.stdout + firings.stderr
            time.sleep(0.5)
        assert firings.returncode == 0 and "composite:0" in firings.stdout and "hello succeeded" in firings.stdout
        unknown = _cli(home, port, "firings", "nope")
        assert unknown.returncode == 1 and "not_found" in unknown.stderr

        # A bad file gets a clear message and a non-zero exit, not a traceback.
        bad = tmp_path / "bad.yaml"
        bad.write_text("- name: oops\n  runtime: platform\n  operator: nope\n")
        refused = _cli(home, port, "apply", str(bad))
        assert refused.returncode == 1 and "unknown_operator" in refused.stderr and "jobs[0].operator" in \
            refused.stderr and "Traceback" not in refused.stderr

        # The chain of TRACE_CHAINS is followed by `trace up`'s follower; its history is backfilled
        # by the worker's chunk tasks, and the query service sees cold and hot as one table.
        headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"}

        def chain_status() -> dict[str, Any]:
            return dict(requests.get(f"http://127.0.0.1:{port}/v1/chains/anvil", headers=headers, timeout=5).json())

        wait_for(lambda: (chain_status().get("finalized_block") or 0) >= 999 and
                 chain_status().get("ingested_block") == node.block_number(), timeout=60,
                 message="the follower to reach the tip")
        listed = _cli(home, port, "chains")
        assert listed.returncode == 0 and "anvil" in listed.stdout and "following" in listed.stdout, listed
        filled = _cli(home, port, "backfill", "anvil", "0", "999")
        assert filled.returncode == 0, filled.stderr
        assert "1/1 chunks" in filled.stdout, filled.stdout
        counted = requests.post(f"http://127.0.0.1:{port}/v1/query", headers=headers, timeout=30,
                                json={"sql": "SELECT count(*) AS n FROM anvil_blocks"}).json()
        assert counted["rows"] == [{"n": node.block_number() + 1}], counted
        beyond = _cli(home, port, "backfill", "anvil", "0", "5000")
        assert beyond.returncode == 1 and "beyond_finality" in beyond.stderr, beyond
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
        try:
            exit_code = up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            raise
    assert exit_code == 0, log.read_text(errors="replace")
    assert "Trace stopped." in log.read_text(errors="replace")
    # Nothing of this home outlives `trace up`: no API, worker, beat, postgres or redis.
    time.sleep(0.5)
    leftovers = _trace_processes(home)
    assert leftovers == [], [process.info["cmdline"] for process in leftovers]
    subprocess.run(["rm", "-rf", str(home)], check=False)
