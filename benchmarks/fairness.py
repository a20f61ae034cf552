"""Fairness under a flood: org B's trigger -> start while org A's backlog drains, beside B's
trigger -> start with no flood, measured in the same run on the same platform (one worker process).

Org A enqueues ``--flood`` ``noop`` runs through the API (``--senders`` kept-alive connections at
once); then org B triggers one ``noop`` run every ``--interval`` seconds, ``--light`` times, while
A's backlog is still in the broker (its depth is sampled at each of B's triggers and printed). The
baseline is the same ``--light`` triggers of B before A's flood. Trigger -> start is the client's
wall clock before the POST to the attempt's ``started_at`` (same host, same clock).

``--compare-one-queue`` repeats the whole on a second platform with ``TRACE_BROKER_ORG_QUEUES=0``
(one shared first-in-first-out queue, what Trace did before org queues).

A and B are chosen on two different org queues (a new org is made until its queue differs): two
orgs that hash onto the same queue share it first in first out (docs/reliability.md, Fairness).

    python benchmarks/fairness.py [--flood 10000] [--light 100] [--compare-one-queue]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.client import HTTPConnection
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.harness import Platform, percentile, running_platform
from workers.messages import org_queue, queue_names

NOOP_DAG = "- name: bench_noop\n  runtime: platform\n  operator: noop\n"


@dataclass
class Org:
    org_id: uuid.UUID
    token: str


def make_org(platform: Platform, name: str) -> Org:
    """An org with an admin token, made on the host as `trace up` makes its first one."""
    from tracecore.appctx import create_base_app
    from tracecore.db.engine import db
    from tracecore.tenancy import orgs

    app = create_base_app(platform.settings)
    with app.app_context():
        org = orgs.create_org(name)
        user = orgs.get_or_create_user(f"admin@{name}.example")
        orgs.add_member(org, user, orgs.Role.admin)
        _, token = orgs.issue_token(org.id, user.id, name="bench")
        db.session.commit()
        made = Org(org.id, token)
        db.session.remove()
        db.engine.dispose()
    platform.http.put(f"{platform.url}/v1/dags/bench", data=NOOP_DAG,
                      headers={"Content-Type": "application/yaml", "Authorization": f"Bearer {token}"}
                      ).raise_for_status()
    return made


class Client:
    """One kept-alive connection that triggers ``bench_noop`` for one org."""

    def __init__(self, url: str, org: Org) -> None:
        address = urlsplit(url)
        self.api = HTTPConnection(address.hostname or "127.0.0.1", address.port)
        self.headers = {"Authorization": f"Bearer {org.token}", "Content-Type": "application/json"}

    def trigger(self) -> str:
        self.api.request("POST", "/v1/jobs/bench_noop/runs", body=b"{}", headers=self.headers)
        response = self.api.getresponse()
        body = response.read()
        if response.status != 202:
            raise SystemExit(f"POST run answered {response.status}: {body.decode(errors='replace')}")
        return str(json.loads(body)["run_id"])


def light_triggers(platform: Platform, org: Org, count: int, interval: float,
                   broker: redis.Redis, queues: list[str]) -> tuple[list[tuple[float, str]], list[int]]:
    """B's triggers, one every ``interval``: (wall clock before the POST, run id), and the broker's
    depth (every queue) sampled just before each."""
    client = Client(platform.url, org)
    sent: list[tuple[float, str]] = []
    depths: list[int] = []
    next_at = time.monotonic()
    for _ in range(count):
        pause = next_at - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        next_at += interval
        with broker.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.llen(queue)
            depths.append(sum(pipe.execute()))
        start = time.time()
        sent.append((start, client.trigger()))
    client.api.close()
    return sent, depths


def trigger_to_start(platform: Platform, sent: list[tuple[float, str]], timeout: float = 600) -> list[float]:
    """Milliseconds from each trigger to its attempt's start (waits until every run started)."""
    runs = [run_id for _, run_id in sent]
    deadline = time.monotonic() + timeout
    with psycopg.connect(platform.settings.database_url or "", autocommit=True) as conn:
        while True:
            rows: dict[str, float] = dict(conn.execute(
                "SELECT CAST(t.run_id AS text), EXTRACT(EPOCH FROM min(a.started_at)) FROM attempts a "
                "JOIN tasks t ON t.id = a.task_id WHERE t.run_id = ANY(CAST(%s AS uuid[])) GROUP BY t.run_id",
                (runs,)).fetchall())
            if len(rows) == len(runs):
                return [(float(rows[run_id]) - at) * 1000 for at, run_id in sent]
            if time.monotonic() > deadline:
                raise SystemExit(f"{len(runs) - len(rows)} of B's runs never started")
            time.sleep(0.2)


def flood(platform: Platform, org: Org, total: int, senders: int) -> float:
    """A's ``total`` triggers over ``senders`` connections at once; answers the seconds it took."""
    per_sender = [total // senders + (1 if n < total % senders else 0) for n in range(senders)]

    def send(count: int) -> None:
        client = Client(platform.url, org)
        for _ in range(count):
            client.trigger()
        client.api.close()

    start = time.monotonic()
    threads = [threading.Thread(target=send, args=(count,)) for count in per_sender]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.monotonic() - start


def measure(org_queues: int, args: argparse.Namespace) -> dict[str, object]:
    env = {"TRACE_RUN_RATE_LIMIT": str(10 * (args.flood + 2 * args.light)),
           "TRACE_BROKER_ORG_QUEUES": str(org_queues)}
    with running_platform(env=env) as platform:
        a = make_org(platform, "org-a")
        b = make_org(platform, "org-b-0")
        for attempt in range(1, 50):  # B on a queue of its own (see the module's docstring)
            if org_queues == 0 or org_queue("trace", org_queues, b.org_id) != org_queue("trace", org_queues, a.org_id):
                break
            b = make_org(platform, f"org-b-{attempt}")
        broker = redis.Redis.from_url(platform.settings.broker_url or "")
        queues = queue_names("trace", org_queues)
        Client(platform.url, b).trigger()  # warm-up: the worker's first task and the API's first request
        time.sleep(1)

        quiet_sent, quiet_depths = light_triggers(platform, b, args.light, args.interval, broker, queues)
        quiet = trigger_to_start(platform, quiet_sent)
        seconds = flood(platform, a, args.flood, args.senders)
        flood_sent, flood_depths = light_triggers(platform, b, args.light, args.interval, broker, queues)
        flooded = trigger_to_start(platform, flood_sent)
        under = [value for value, depth in zip(flooded, flood_depths, strict=True) if depth > 0]
        broker.close()
        return {"org_queues": org_queues, "quiet": quiet, "flooded": flooded, "under": under,
                "flood_seconds": seconds, "depths": flood_depths, "quiet_depths": quiet_depths}


def report(result: dict[str, object], args: argparse.Namespace) -> None:
    quiet, flooded, under = result["quiet"], result["flooded"], result["under"]
    depths = result["depths"]
    assert isinstance(quiet, list) and isinstance(flooded, list) and isinstance(under, list)
    assert isinstance(depths, list)
    queues = result["org_queues"]
    label = f"{queues} org queues" if queues else "one shared queue"
    print(f"\n== {label}: org A enqueued {args.flood} noop runs in {result['flood_seconds']:.1f} s "
          f"({args.senders} connections); broker depth at B's triggers: first {depths[0]}, "
          f"median {int(statistics.median(depths))}, last {depths[-1]}; "
          f"{len(under)} of {len(flooded)} B triggers with A's backlog still queued")
    print(f"{'org B trigger -> start (ms)':44} {'p50':>9} {'p95':>9} {'max':>9}")
    for name, values in (("no flood (baseline)", quiet), ("during A's flood, all triggers", flooded),
                         ("  of which with A's backlog queued", under)):
        if values:
            print(f"{name:44} {percentile(values, .5):9.2f} {percentile(values, .95):9.2f} {max(values):9.2f}")
    if under:
        ratio = percentile(under, .95) / percentile(quiet, .95)
        print(f"ratio p95 under flood / p95 without: {ratio:.2f}x   "
              f"(goal <= 2x: {'met' if ratio <= 2 else 'NOT met'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flood", type=int, default=10000, help="org A's noop runs")
    parser.add_argument("--light", type=int, default=100, help="org B's triggers, in each phase")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between B's triggers")
    parser.add_argument("--senders", type=int, default=4, help="A's connections at once")
    parser.add_argument("--org-queues", type=int, default=16)
    parser.add_argument("--compare-one-queue", action="store_true",
                        help="also measure with one shared first-in-first-out queue (TRACE_BROKER_ORG_QUEUES=0)")
    args = parser.parse_args()
    for org_queues in ([args.org_queues, 0] if args.compare_one_queue else [args.org_queues]):
        report(measure(org_queues, args), args)


if __name__ == "__main__":
    main()
