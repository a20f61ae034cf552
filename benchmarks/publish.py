"""Publish throughput: 1M rows with 10% duplicates into a buffered dataset through ``buffer_publish``.

In the same run, on the same embedded PostgreSQL and the same rows:

- the baseline: a plain ``COPY`` of the rows (pre-rendered as CSV, so only the server's work
  and the wire are timed) into an unconstrained table with the same column types;
- Trace: ``tracecore.data.publish.buffer_publish`` in-process, end to end: fence check, reading the
  Parquet batch from the local object store, SHA-256, schema and unique-key validation, COPY
  into a temp table, ``INSERT ... SELECT ... ON CONFLICT (org_id, dedupe_key) DO NOTHING`` into
  the hot table (its unique index maintained), the new version, lineage, commit;
- for where the time goes: ``INSERT ... SELECT`` of the copied rows into a table with the hot
  table's unique index (no ON CONFLICT, no duplicates rejected: the index upkeep alone);
- the same batch published again (an at-least-once retry): every row a duplicate, no version.

The rows look like ``alert_events``: ``dedupe_key`` (unique key, 900,000 distinct values, each
tenth row a repeat of an earlier key, shuffled), ``block`` int64, ``score`` float64, ``note``
string. Each repeat publishes into a fresh dataset, so every repeat does the same work; the
figures are medians.

    python benchmarks/publish.py [--rows 1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tracecore.appctx import create_base_app
from tracecore.dags import catalog as dags
from tracecore.data import publish
from tracecore.data.batches import encode
from tracecore.data.schema import arrow_schema, normalize_schema, schema_fingerprint
from tracecore.db.engine import db, libpq_url
from tracecore.db.migrate import upgrade
from tracecore.execution import (
    lease,
    runs,
    tokens,
)
from tracecore.infra.embedded import EmbeddedServices
from tracecore.infra.storage import object_store
from tracecore.settings import Settings
from tracecore.tenancy import orgs

COLUMNS = normalize_schema([{"name": "dedupe_key", "type": "string", "nullable": False},
                            {"name": "block", "type": "int64"}, {"name": "score", "type": "float64"},
                            {"name": "note", "type": "string"}])
BASELINE_DDL = "CREATE TABLE copy_{n} (dedupe_key text NOT NULL, block bigint, score double precision, note text)"
INDEXED_DDL = ("CREATE TABLE indexed_{n} (dedupe_key text NOT NULL, block bigint, score double precision, note text, "
               "org_id uuid NOT NULL, _version integer NOT NULL, UNIQUE (org_id, dedupe_key))")
INDEXED_FILL = ("INSERT INTO indexed_{n} SELECT DISTINCT ON (dedupe_key) *, "
                "'00000000-0000-0000-0000-000000000001'::uuid, 1 FROM copy_{n}")
GOAL_ROWS_PER_S = 50_000


def make_rows(count: int) -> pa.Table:
    """``count`` rows, 10% of them repeating an earlier key, in a fixed shuffled order."""
    rng = random.Random(7)
    distinct = count - count // 10
    keys = list(range(distinct)) + [rng.randrange(distinct) for _ in range(count // 10)]
    rng.shuffle(keys)
    return pa.table({"dedupe_key": [f"0x{key:064x}" for key in keys], "block": keys,
                     "score": [key / 7 for key in keys], "note": [f"alert {key % 97}" for key in keys]},
                    schema=arrow_schema(COLUMNS))


def dag_body(repeats: int) -> list[dict]:
    return [{"name": f"sink{n}", "runtime": "platform", "operator": "noop", "unique_key": ["dedupe_key"],
             "update_strategy": "append",
             "outputs": [{"dataset": f"alert_events_{n}", "kind": "buffered", "schema": COLUMNS}]}
            for n in range(repeats)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="trace-bench-publish-", dir="/tmp"))
    services = EmbeddedServices(home)
    # No broker is contacted: the publish runs in-process.
    settings = services.start(Settings(home=str(home), broker_url="redis://127.0.0.1:1/0"))
    try:
        upgrade(settings.database_url or "")
        app = create_base_app(settings, name="trace-bench")
        table = make_rows(args.rows)
        csv = io.BytesIO()
        pacsv.write_csv(table, csv, pacsv.WriteOptions(include_header=False))
        data, digest = encode(table)
        copy_s: list[float] = []
        indexed_s: list[float] = []
        publish_s: list[float] = []
        retry_s: list[float] = []
        results = []
        with app.app_context(), psycopg.connect(libpq_url(settings.database_url or "")) as pg:
            org = orgs.create_org("bench")
            dags.save_dag(org.id, "bench", dag_body(args.repeats), content_type="application/json", user_id=None)
            db.session.commit()
            store = object_store(settings)
            for n in range(args.repeats):
                pg.execute(BASELINE_DDL.format(n=n))
                pg.commit()
                start = time.perf_counter()
                with pg.cursor().copy(f"COPY copy_{n} FROM STDIN (FORMAT csv)") as copy:
                    view = csv.getbuffer()
                    for offset in range(0, len(view), 1 << 20):
                        copy.write(view[offset:offset + (1 << 20)])
                    view.release()
                pg.commit()
                copy_s.append(time.perf_counter() - start)
                pg.execute(INDEXED_DDL.format(n=n))
                pg.commit()
                start = time.perf_counter()
                pg.execute(INDEXED_FILL.format(n=n))
                pg.commit()
                indexed_s.append(time.perf_counter() - start)

                _, task_id = runs.create_run(org_id=org.id, job_name=f"sink{n}", cause="manual", triggered_by=None)
                db.session.commit()
                held = lease.take(task_id, "bench", 600)
                assert isinstance(held, lease.Lease)
                capability = tokens.for_lease(held, settings)
                key = f"{capability.output_prefix}alert_events_{n}/{digest}.parquet"
                store.put(key, data)
                manifest = {"dataset": f"alert_events_{n}", "schema_fingerprint": schema_fingerprint(COLUMNS),
                            "row_count": table.num_rows, "sha256": digest, "key": key,
                            "task_id": capability.task_id, "fence": capability.fence}
                start = time.perf_counter()
                result = publish.buffer_publish(capability, manifest, store=store)
                publish_s.append(time.perf_counter() - start)
                results.append(result)
                start = time.perf_counter()
                again = publish.buffer_publish(capability, manifest, store=store)
                retry_s.append(time.perf_counter() - start)
                assert again.inserted == 0 and again.version == result.version
        first = results[0]
        expected_new = args.rows - args.rows // 10
        assert all(r.inserted == expected_new and r.duplicates == args.rows // 10 for r in results), results
        copy_rate, publish_rate, retry_rate = (args.rows / statistics.median(s) for s in (copy_s, publish_s, retry_s))
        print(f"publish throughput: {args.rows:,} rows, {args.rows // 10:,} duplicates "
              f"({first.inserted:,} inserted), median of {args.repeats}")
        print(f"{'':52} {'seconds':>8} {'rows/s':>10}")
        for label, seconds in (("plain COPY into an unconstrained table (baseline)", copy_s),
                               ("  (INSERT ... SELECT into the same unique index)", indexed_s),
                               ("Trace buffer_publish (validate + dedupe + version)", publish_s),
                               ("Trace buffer_publish, same batch again (retry)", retry_s)):
            print(f"{label:52} {statistics.median(seconds):8.2f} {args.rows / statistics.median(seconds):10,.0f}")
        print(f"ratio buffer_publish / plain COPY: {publish_rate / copy_rate:.2f}x the baseline's rate "
              f"({statistics.median(publish_s) / statistics.median(copy_s):.2f}x its time)")
        print(f"goal >= {GOAL_ROWS_PER_S:,} rows/s: {'met' if publish_rate >= GOAL_ROWS_PER_S else 'NOT met'} "
              f"({publish_rate:,.0f} rows/s; retry {retry_rate:,.0f} rows/s)")
    finally:
        services.stop()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
