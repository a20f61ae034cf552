"""Chained step latency: upstream attempt recorded -> downstream attempt started.

A DAG of 40 `noop` jobs in a chain (step_01 reads step_00's output, and so on) is run
with ``POST /v1/dags/chain/runs`` through the API, on embedded PostgreSQL and Redis
with one real worker, as `trace up` would run it. Each step's latency is taken from
the database: the downstream attempt's ``started_at`` minus the upstream attempt's
``finished_at``, so client timing plays no part. Several runs of the chain give
``runs * 39`` hand-offs.

The baseline, run interleaved with it on the same broker and worker: a raw Celery chain of 40
trivial tasks (``trace.clock``, immutable signatures, results in the same Redis backend), each
hop being the next task's start minus the previous task's end, both read from the worker's
clock. Published anchors are printed for context (not measured here): Hatchet about 31 ms,
Temporal about 74 ms, Airflow about 2.9 s per step.

    python benchmarks/chain.py [--runs 10] [--steps 40]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import psycopg
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.harness import percentile, running_platform

ANCHORS = (("Hatchet", 31.0), ("Temporal", 74.0), ("Airflow", 2900.0))
GOAL_P95_MS = 20.0


def chain_dag(steps: int) -> str:
    lines = []
    for i in range(steps):
        lines += [f"- name: step_{i:02d}", "  runtime: platform", "  operator: noop", "  outputs: 1"]
        if i:
            lines.append(f"  inputs: [{{from: {{job: step_{i - 1:02d}, output: 0}}}}]")
    return "\n".join(lines) + "\n"


def wait_run(http: requests.Session, url: str, run_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = http.get(f"{url}/v1/runs/{run_id}").json()
        if run["status"] in ("succeeded", "failed", "canceled"):
            return run
        time.sleep(0.2)
    raise SystemExit(f"run {run_id} did not finish in {timeout} s")


_GAPS = """
SELECT EXTRACT(EPOCH FROM down_a.started_at - up_a.finished_at) * 1000
FROM tasks down_t JOIN jobs down_j ON down_j.id = down_t.job_id
JOIN attempts down_a ON down_a.task_id = down_t.id AND down_a.state = 'succeeded'
JOIN tasks up_t ON up_t.run_id = down_t.run_id
JOIN jobs up_j ON up_j.id = up_t.job_id
JOIN attempts up_a ON up_a.task_id = up_t.id AND up_a.state = 'succeeded'
WHERE down_t.run_id = %s AND down_j.name LIKE 'step_%%' AND up_j.name LIKE 'step_%%'
  AND CAST(substr(down_j.name, 6) AS integer) = CAST(substr(up_j.name, 6) AS integer) + 1
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()

    with running_platform() as platform:
        settings, home, url, http = platform.settings, platform.home, platform.url, platform.http
        http.put(f"{url}/v1/dags/chain", data=chain_dag(args.steps),
                 headers={"Content-Type": "application/yaml"}).raise_for_status()

        from celery import Celery, chain
        from celery.result import AsyncResult, ResultBase

        celery = Celery("bench", broker=settings.broker_url, backend=settings.broker_url)
        celery.conf.task_default_queue = "trace"

        def celery_chain_hops() -> list[float]:
            last = chain(*[celery.signature("trace.clock", immutable=True) for _ in range(args.steps)]).apply_async()
            last.get(timeout=120)
            clocks = []
            node: ResultBase | None = last
            while isinstance(node, AsyncResult):  # each link's result, back to the first
                clocks.append(node.get(timeout=10))
                node = node.parent
            clocks.reverse()
            return [(start - previous_end) * 1000 for (_, previous_end), (start, _) in itertools.pairwise(clocks)]

        gaps: list[float] = []
        baseline: list[float] = []
        for number in range(args.warmup + args.runs):
            hops = celery_chain_hops()
            if number >= args.warmup:
                baseline += hops
            response = http.post(f"{url}/v1/dags/chain/runs", json={})
            response.raise_for_status()
            run_id = response.json()["run_id"]
            run = wait_run(http, url, run_id)
            if run["status"] != "succeeded":
                raise SystemExit(f"run {run_id} ended {run['status']}; see {home / 'children.log'}")
            if number < args.warmup:
                continue
            with psycopg.connect(settings.database_url or "") as conn:
                found = [float(row[0]) for row in conn.execute(_GAPS, (run_id,))]
            if len(found) != args.steps - 1:
                raise SystemExit(f"run {run_id}: {len(found)} hand-offs, expected {args.steps - 1}")
            gaps += found

        print(f"chained step latency: upstream attempt recorded -> downstream attempt started, "
              f"{args.runs} runs of a {args.steps}-step noop chain, {len(gaps)} hand-offs, interleaved with as many "
              f"runs of a raw Celery chain (ms)")
        print(f"{'':48} {'p50':>9} {'p95':>9} {'mean':>9} {'max':>9}")
        for name, values in (("raw Celery chain hop (baseline)", baseline), ("Trace: DAG-run hand-off", gaps)):
            print(f"{name:48} {percentile(values, .5):9.2f} {percentile(values, .95):9.2f} "
                  f"{statistics.fmean(values):9.2f} {max(values):9.2f}")
        print(f"ratio Trace / raw Celery: p50 {percentile(gaps, .5) / percentile(baseline, .5):.2f}x, "
              f"p95 {percentile(gaps, .95) / percentile(baseline, .95):.2f}x")
        for name, ms in ANCHORS:
            print(f"{name + ' per step (anchor, not measured here)':48} {ms:9.1f}")
        p95 = percentile(gaps, .95)
        print(f"goal p95 <= {GOAL_P95_MS:.0f} ms: {'met' if p95 <= GOAL_P95_MS else 'NOT met'} (p95 {p95:.2f} ms)")


if __name__ == "__main__":
    main()
