"""Dispatch overhead: manual trigger of a `noop` job -> attempt recorded as succeeded.

Beside it, in the same run, on the same broker and the same worker process: the raw
Celery round trip of a trivial task (``send_task("trace.ping").get()``). Both are
timed by the client: the Trace figure starts before the POST and ends when the
run-finished notification (PostgreSQL NOTIFY, sent in the transaction that records
the attempt) arrives; the Celery figure starts before ``send_task`` and ends when
``.get()`` returns. The POST goes out through the standard library's ``http.client`` on one
kept-alive connection, as any lean HTTP client would send it: the figure is the platform's,
not a client library's (``requests`` spends about 0.3 ms of the client's CPU per call, on the
same two cores the platform runs on).

``--org-queues 0,16`` measures once per value of TRACE_BROKER_ORG_QUEUES (each on its own platform,
one after the other, in the same run) and prints how the second and later compare with the first:
the cost of the org queues (docs/reliability.md, Fairness) on the hot path.

    python benchmarks/dispatch.py [--runs 500] [--org-queues 0,16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from http.client import HTTPConnection
from pathlib import Path
from urllib.parse import urlsplit

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.harness import percentile, running_platform
from tracecore.execution.lease import RUN_FINISHED_CHANNEL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--org-queues", default="", help="comma-separated TRACE_BROKER_ORG_QUEUES values to compare")
    args = parser.parse_args()
    settings: list[int | None] = [int(value) for value in args.org_queues.split(",") if value.strip()]
    settings = settings or [None]
    figures = [measure(args, org_queues) for org_queues in settings]
    for org_queues, (_, trace) in zip(settings[1:], figures[1:], strict=True):
        first = figures[0][1]
        p50, p95 = (percentile(trace, q) / percentile(first, q) for q in (.5, .95))
        print(f"org queues {org_queues} / {settings[0]}: Trace p50 {p50:.3f}x, p95 {p95:.3f}x")


def measure(args: argparse.Namespace, org_queues: int | None) -> tuple[list[float], list[float]]:
    """One platform: (raw Celery round trips, Trace dispatches), in ms; prints its table."""
    # The per-org run rate limit (600 a minute by default) is not what is measured here.
    env = {"TRACE_RUN_RATE_LIMIT": str(2 * (args.runs + args.warmup))}
    if org_queues is not None:
        env["TRACE_BROKER_ORG_QUEUES"] = str(org_queues)
    with running_platform(env=env) as platform:
        settings, url, http = platform.settings, platform.url, platform.http
        put = http.put(f"{url}/v1/dags/bench", data="- name: bench_noop\n  runtime: platform\n  operator: noop\n",
                       headers={"Content-Type": "application/yaml"})
        put.raise_for_status()

        from celery import Celery

        celery = Celery("bench", broker=settings.broker_url, backend=settings.broker_url)
        celery.conf.task_default_queue = "trace"

        listener = psycopg.connect(settings.database_url or "", autocommit=True)
        listener.execute(f"LISTEN {RUN_FINISHED_CHANNEL}")
        notifications = listener.notifies()

        address = urlsplit(url)
        api = HTTPConnection(address.hostname or "127.0.0.1", address.port)
        headers = {"Authorization": http.headers["Authorization"], "Content-Type": "application/json"}

        def trace_once() -> float:
            start = time.perf_counter()
            api.request("POST", "/v1/jobs/bench_noop/runs", body=b"{}", headers=headers)
            response = api.getresponse()
            body = response.read()
            if response.status != 202:
                raise SystemExit(f"POST run answered {response.status}: {body.decode(errors='replace')}")
            run_id = json.loads(body)["run_id"]
            for note in notifications:
                if note.payload.startswith(run_id):
                    if not note.payload.endswith("succeeded"):
                        raise SystemExit(f"run {run_id} ended {note.payload}")
                    return (time.perf_counter() - start) * 1000
            raise SystemExit("notification stream ended")

        def celery_once() -> float:
            start = time.perf_counter()
            assert celery.send_task("trace.ping").get(timeout=10) == "pong"
            return (time.perf_counter() - start) * 1000

        for _ in range(args.warmup):
            celery_once()
            trace_once()
        raw: list[float] = []
        trace: list[float] = []
        for _ in range(args.runs):  # interleaved, so drift hits both equally
            raw.append(celery_once())
            trace.append(trace_once())
        with psycopg.connect(settings.database_url or "") as conn:
            server = [row[0] for row in conn.execute(
                "SELECT EXTRACT(EPOCH FROM a.finished_at - r.created_at) * 1000 FROM runs r "
                "JOIN tasks t ON t.run_id = r.id JOIN attempts a ON a.task_id = t.id "
                "ORDER BY r.created_at DESC LIMIT %s", (args.runs,))]
        listener.close()
        api.close()

        rows = [("raw Celery round trip (baseline)", raw), ("Trace: POST run -> attempt succeeded", trace),
                ("  of which server side (run row -> attempt row)", server)]
        queues = "" if org_queues is None else f", TRACE_BROKER_ORG_QUEUES={org_queues}"
        print(f"dispatch overhead, {args.runs} runs each, interleaved (ms){queues}")
        print(f"{'':48} {'p50':>8} {'p95':>8} {'mean':>8}")
        for label, values in rows:
            print(f"{label:48} {percentile(values, .5):8.2f} {percentile(values, .95):8.2f} "
                  f"{statistics.fmean(values):8.2f}")
        p95_ratio = percentile(trace, .95) / percentile(raw, .95)
        p50_ratio = percentile(trace, .5) / percentile(raw, .5)
        print(f"ratio Trace / raw Celery: p50 {p50_ratio:.2f}x, p95 {p95_ratio:.2f}x   "
              f"(goal: p95 <= 5 ms and <= 1.5x)")
        print(f"goal p95 <= 5 ms: {'met' if percentile(trace, .95) <= 5 else 'NOT met'}; "
              f"goal <= 1.5x: {'met' if p95_ratio <= 1.5 else 'NOT met'}")
        return raw, trace



if __name__ == "__main__":
    main()
