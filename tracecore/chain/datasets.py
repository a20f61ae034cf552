"""A chain's three datasets (``<chain>_blocks``, ``_transactions``, ``_logs``) as the rest of
Trace sees them: platform datasets of kind ``chain`` that every org reads, one view over cold
chunks and hot rows, and one update (dataset version) per committed block range.

The view is pinned when it is made, in the caller's snapshot: the cold chunks registered then,
plus the hot rows above the cold boundary ``C`` read then. Compaction commits a chunk and moves
``C`` in one transaction and prunes the hot rows it covers only after a grace period longer than
any query (``TRACE_CHAIN_PRUNE_GRACE``), so a query that started before a compaction reads those
blocks from the hot tables and one that started after reads them from the chunk: each block
exactly once.

An update's version records the block range (partition ``blocks:<a>-<b>``) and, after a reorg,
``window.reorg = {fork_block, depth, orphaned_block_hashes}``; reactive jobs get both in their
window. The version's manifest lists no files: chain data is read as of the query, not as of a
version (the chain only moves forward, or is corrected by a reorg).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert

from tracecore.chain.chains import CHAIN_DATASETS, Chain
from tracecore.chain.cryo import SCHEMAS
from tracecore.chain.hot import ChainChunk
from tracecore.data.datasets import PLATFORM_ORG_ID, Dataset, DatasetView, register_view_source
from tracecore.data.schema import normalize_schema, schema_fingerprint, type_name
from tracecore.db.engine import db

HOT_TABLES = {"blocks": "chain_blocks", "transactions": "chain_transactions", "logs": "chain_logs"}
UNIQUE_KEYS = {"blocks": ["block_number"], "transactions": ["block_number", "transaction_index"],
               "logs": ["block_number", "log_index"]}

_NEW_VERSIONS = text("""
WITH bumped AS (
    UPDATE datasets SET latest_version = latest_version + 1, current_version = latest_version + 1, updated_at = now()
    WHERE id = ANY(:ids)
    RETURNING id, org_id, latest_version, schema_fingerprint
)
INSERT INTO dataset_versions (id, dataset_id, org_id, version, manifest, rows, bytes, schema_fingerprint,
                              partition_key, metadata)
SELECT gen_random_uuid(), id, org_id, latest_version, CAST('{"files": [], "rows": 0, "bytes": 0}' AS jsonb), 0, 0,
       schema_fingerprint, :partition_key, CAST(:metadata AS jsonb)
FROM bumped
RETURNING dataset_id, version
""")


def dataset_name(chain: str, kind: str) -> str:
    return f"{chain}_{kind}"


def columns_of(kind: str) -> list[dict[str, Any]]:
    """The dataset's declared schema: cryo's columns and Arrow types."""
    schema: pa.Schema = SCHEMAS[kind]
    return normalize_schema([{"name": f.name, "type": type_name(f.type), "nullable": f.nullable} for f in schema])


def declare_chain_datasets(chain: Chain) -> list[Dataset]:
    """Create the chain's three datasets under the platform org (idempotent). Flushes."""
    made = []
    for kind in CHAIN_DATASETS:
        columns = columns_of(kind)
        name = dataset_name(chain.name, kind)
        db.session.execute(insert(Dataset).values(
            id=uuid.uuid4(), org_id=PLATFORM_ORG_ID, name=name, kind="chain", schema=columns,
            schema_fingerprint=schema_fingerprint(columns), unique_key=UNIQUE_KEYS[kind], pii=False,
            latest_version=0, description=f"{kind.capitalize()} of chain {chain.name} (chain id {chain.chain_id}), "
                                          "cryo 0.3.2 columns; cold Parquet chunks and hot rows as one view")
            .on_conflict_do_nothing(index_elements=["org_id", "name"]))
        made.append(db.session.scalar(select(Dataset).where(Dataset.org_id == PLATFORM_ORG_ID,
                                                            Dataset.name == name)))
    db.session.flush()
    return [dataset for dataset in made if dataset is not None]


def dataset_ids(chain: str) -> dict[str, uuid.UUID]:
    """The chain's datasets' ids by kind."""
    names = {dataset_name(chain, kind): kind for kind in CHAIN_DATASETS}
    rows = db.session.execute(select(Dataset.name, Dataset.id).where(Dataset.org_id == PLATFORM_ORG_ID,
                                                                     Dataset.name.in_(list(names))))
    return {names[name]: dataset_id for name, dataset_id in rows}


def publish_update(chain: str, first: int, last: int, *, reorg: Mapping[str, Any] | None = None,
                   ids: Sequence[uuid.UUID] | None = None) -> list[tuple[uuid.UUID, int]]:
    """One update of the chain's three datasets for blocks ``first..last``, in the caller's
    transaction (the one that wrote the rows); answers (dataset id, version) to announce after
    the commit."""
    window: dict[str, Any] = {"chain": chain, "block_start": first, "block_end": last}
    if reorg is not None:
        window["reorg"] = dict(reorg)
    rows = db.session.execute(_NEW_VERSIONS, {
        "ids": list(ids if ids is not None else dataset_ids(chain).values()),
        "partition_key": f"blocks:{first}-{last}",
        "metadata": json.dumps({"window": window, "blocks": last - first + 1})})
    return [(row.dataset_id, row.version) for row in rows]


def _kind_of(dataset: Dataset) -> tuple[str, str]:
    chain, _, kind = dataset.name.rpartition("_")
    return chain, kind


def chain_view(name: str, dataset: Dataset) -> DatasetView:
    """The Query Service's view of a chain dataset, pinned now (module docstring)."""
    chain, kind = _kind_of(dataset)
    boundary = db.session.scalar(select(Chain.cold_boundary).where(Chain.name == chain))
    boundary = -1 if boundary is None else int(boundary)
    keys = tuple(db.session.scalars(select(ChainChunk.key).where(
        ChainChunk.chain == chain, ChainChunk.dataset == kind, ChainChunk.end_block <= boundary)
        .order_by(ChainChunk.start_block)))
    columns = tuple((c["name"], c["type"]) for c in dataset.schema or ())
    listed = ", ".join(f'"{column}"' for column, _ in columns)
    statement = (f"SELECT {listed} FROM {HOT_TABLES[kind]} WHERE chain = %s AND block_number > %s "
                 f"ORDER BY {', '.join(UNIQUE_KEYS[kind])}")
    return DatasetView(dataset_id=dataset.id, org_id=dataset.org_id, name=name, version=dataset.current_version,
                       parquet_keys=keys, hot_table=None, columns=columns, pii=False,
                       hot_sql=(statement, (chain, boundary)))


register_view_source("chain", chain_view)
