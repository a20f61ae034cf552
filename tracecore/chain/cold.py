"""Cold chunks: compaction of final hot blocks into cryo Parquet, chunk registration, pruning.

The order that makes a crash harmless (``datasets`` explains the readers' side):

1. the next chunk ``[C+1, C+1000]`` is final (the finality boundary passed its end): its hot
   rows are read and checked (1000 heights present, parent links intact);
2. its three files are written to the object store (same bytes on a retry: the key is the
   cryo file name, the content is a function of the rows);
3. one transaction, under the follower's fence: the chunks are registered and ``C`` moves to
   the chunk's end (a reader pinned before sees the blocks hot, one pinned after sees them cold);
4. later, once the chunk is older than ``TRACE_CHAIN_PRUNE_GRACE``, the hot rows at or below it
   are deleted.

A crash before 3 leaves files no reader names (rewritten identically next time); after 3 and
before 4, hot rows that no reader reads (hot reads start above ``C``).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import psycopg
import pyarrow as pa
from sqlalchemy.dialects.postgresql import insert

from tracecore.chain import sql
from tracecore.chain.chains import CHAIN_DATASETS, CHUNK_BLOCKS
from tracecore.chain.cryo import SCHEMAS, file_name, write_parquet
from tracecore.chain.datasets import HOT_TABLES, UNIQUE_KEYS
from tracecore.chain.hot import ChainChunk
from tracecore.chain.ingest import Lease, lock_fenced
from tracecore.db.engine import db
from tracecore.infra.storage import ObjectStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkFile:
    dataset: str
    start: int
    end: int
    key: str
    sha256: str
    rows: int
    bytes: int


def chunk_key(chain: str, network: str, dataset: str, start: int, end: int) -> str:
    return f"chains/{chain}/{dataset}/{file_name(network, dataset, start, end)}"


def network_name(chain_id: int) -> str:
    """cryo's network name for a chain it does not know by name."""
    return f"network_{chain_id}"


def hot_range(chain: str, first: int, last: int, datasets: Sequence[str] = CHAIN_DATASETS) -> dict[str, pa.Table]:
    """Hot rows of ``first..last`` as cryo tables (its columns, types and row order)."""
    cursor = _raw().cursor()
    tables = {}
    for kind in datasets:
        schema: pa.Schema = SCHEMAS[kind]
        listed = ", ".join(f'"{f.name}"' for f in schema)
        cursor.execute(f"SELECT {listed} FROM {HOT_TABLES[kind]} WHERE chain = %s AND block_number BETWEEN %s AND %s "
                       f"ORDER BY {', '.join(UNIQUE_KEYS[kind])}", (chain, first, last))
        rows = cursor.fetchall()
        columns: list[list[Any]] = [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in schema]
        arrays = []
        for f, values in zip(schema, columns, strict=True):
            if pa.types.is_integer(f.type):
                values = [None if v is None else int(v) for v in values]
            elif pa.types.is_large_binary(f.type) or pa.types.is_binary(f.type):
                values = [None if v is None else bytes(v) for v in values]
            arrays.append(pa.array(values, type=f.type))
        tables[kind] = pa.Table.from_arrays(arrays, schema=schema)
    return tables


def hot_headers(chain: str, first: int, last: int) -> list[tuple[int, bytes, bytes]]:
    rows = db.session.execute(sql.HOT_HEADERS, {"chain": chain, "first": first, "last": last})
    return [(int(r.block_number), bytes(r.block_hash), bytes(r.parent_hash)) for r in rows]


def write_chunk(store: ObjectStore, chain: str, network: str, start: int, end: int,
                tables: Mapping[str, pa.Table]) -> list[ChunkFile]:
    """Write each table as the cryo file of ``start..end``; answers what to register."""
    written = []
    for kind, table in tables.items():
        sink = io.BytesIO()
        write_parquet(table, sink)
        data = sink.getvalue()
        key = chunk_key(chain, network, kind, start, end)
        store.put(key, data)
        written.append(ChunkFile(kind, start, end, key, hashlib.sha256(data).hexdigest(), table.num_rows, len(data)))
    return written


def register_chunks(chain: str, files: Sequence[ChunkFile], origin: str) -> None:
    """Record written chunks (a chunk registered already stays as it is). Flushes."""
    if not files:
        return
    db.session.execute(insert(ChainChunk).values([
        {"chain": chain, "dataset": f.dataset, "start_block": f.start, "end_block": f.end, "key": f.key,
         "sha256": f.sha256, "rows": f.rows, "bytes": f.bytes, "origin": origin} for f in files])
        .on_conflict_do_nothing())


def registered(chain: str, start: int) -> set[str]:
    return set(db.session.scalars(sql.CHUNK_DATASETS_AT, {"chain": chain, "start": start}))


def compact_next(lease: Lease, store: ObjectStore, *, chain_id: int, finalized: int | None) -> int | None:
    """Compact the next chunk when it is final and whole in the hot tables; answers the new cold
    boundary, or None when there was nothing to do (not final yet, or a gap: the completeness
    check fills it first). Commits."""
    row = db.session.execute(sql.CHAIN_STATE, {"chain": lease.chain}).one()
    boundary = int(row.cold_boundary)
    start, end = boundary + 1, boundary + CHUNK_BLOCKS
    if finalized is None or end > finalized:
        db.session.rollback()
        return None
    done = registered(lease.chain, start)
    files: list[ChunkFile] = []
    if done != set(CHAIN_DATASETS):
        headers = hot_headers(lease.chain, start, end)
        if len(headers) != CHUNK_BLOCKS or any(b[2] != a[1] for a, b in itertools.pairwise(headers)):
            db.session.rollback()
            log.info("chain %s: chunk %s..%s is not whole and linked in the hot tables yet", lease.chain, start, end)
            return None
        tables = hot_range(lease.chain, start, end, [kind for kind in CHAIN_DATASETS if kind not in done])
        db.session.rollback()  # the files are written outside any transaction
        files = write_chunk(store, lease.chain, network_name(chain_id), start, end, tables)
    locked = lock_fenced(lease)
    if int(locked.cold_boundary) != boundary:  # moved meanwhile (cannot, under one lease; be sure)
        db.session.rollback()
        return None
    register_chunks(lease.chain, files, "compaction")
    db.session.execute(sql.MOVE_COLD_BOUNDARY, {"chain": lease.chain, "boundary": end})
    db.session.commit()
    log.info("chain %s: blocks %s..%s are cold", lease.chain, start, end)
    return end


def prune(chain: str, *, grace_s: float) -> int:
    """Delete hot rows that cold chunks hold, once older than the grace period; answers the
    height pruned through (-1: nothing). Commits."""
    row = db.session.execute(sql.CHAIN_STATE, {"chain": chain}).one()
    through = db.session.execute(sql.PRUNABLE_THROUGH, {"chain": chain, "cold_boundary": row.cold_boundary,
                                                        "grace": grace_s}).scalar()
    if through is None:
        db.session.rollback()
        return -1
    for table in ("chain_logs", "chain_transactions", "chain_blocks"):
        db.session.execute(sql.PRUNE[table], {"chain": chain, "through": through})
    db.session.commit()
    return int(through)


def completeness(chain: str, *, most: int = 100) -> dict[str, Any]:
    """Every height from the chain's start to its last ingested block, exactly once across cold
    and hot: hot gaps, broken parent links, and holes among the cold chunks."""
    row = db.session.execute(sql.CHAIN_STATE, {"chain": chain}).one()
    boundary, ingested, start = int(row.cold_boundary), row.ingested_block, int(row.start_block)
    hot_gaps: list[int] = []
    broken: list[int] = []
    if ingested is not None and ingested > boundary:
        hot_gaps = [int(n) for n in db.session.scalars(sql.HOT_GAPS, {"chain": chain, "first": boundary + 1,
                                                                       "last": int(ingested), "most": most})]
        broken = [int(n) for n in db.session.scalars(sql.BROKEN_LINKS, {"chain": chain, "most": most})]
    cold_gaps = []
    for kind in CHAIN_DATASETS:
        expected = start
        ranges = db.session.execute(sql.CHUNK_RANGES, {"chain": chain, "dataset": kind}).all()
        lowest = min([start, *[int(r.start_block) for r in ranges]])
        expected = lowest
        for r in ranges:
            if int(r.end_block) > boundary:
                break
            if int(r.start_block) > expected:
                cold_gaps.append({"dataset": kind, "from": expected, "to": int(r.start_block) - 1})
            expected = max(expected, int(r.end_block) + 1)
        if expected <= boundary:
            cold_gaps.append({"dataset": kind, "from": expected, "to": boundary})
    db.session.rollback()
    return {"ok": not (hot_gaps or broken or cold_gaps), "hot_gaps": hot_gaps, "broken_links": broken,
            "cold_gaps": cold_gaps, "cold_boundary": boundary, "ingested_block": ingested}


def _raw() -> psycopg.Connection[Any]:
    """The session's own psycopg connection (COPY and plain cursors go through it, in its transaction)."""
    return cast("psycopg.Connection[Any]", db.session.connection().connection.driver_connection)
