"""A backfill's chunk task: fetch an aligned 1000-block range by number in batched requests,
build cryo's tables, check the range is one linked chain, write the files and register them.

A chunk registered already (a finished chunk of this or another backfill, or a compaction) is
skipped: backfills resume and never write a chunk twice. A node that cannot serve the range
(nulls, broken links after retries) fails the chunk, and with it the backfill, saying why.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from tracecore.chain import backfills, cold, ingest
from tracecore.chain.chains import get_chain
from tracecore.chain.cryo import MalformedChainData, tables_from_rpc
from tracecore.db.engine import db
from tracecore.infra.storage import ObjectStore
from tracecore.settings import current_settings

from .follower import header_of
from .rpc import RpcClient, RpcError

log = logging.getLogger(__name__)

ATTEMPTS = 3
# Batched requests in flight while fetching a chunk: a node serves full blocks slowly but several
# at once (anvil answers ~1.5-2x the blocks/s with 4 in flight than with 1; benchmarks/ingest.py).
FETCH_PARALLEL = 4


Bundle = tuple[dict[str, Any], list[dict[str, Any]]]


def fetch_range(client: RpcClient, first: int, last: int, batch: int,
                parallel: int = FETCH_PARALLEL) -> list[Bundle]:
    """The blocks ``first..last`` with their receipts, ``batch * parallel`` blocks at a time with up to
    ``parallel`` batched requests in flight; ValueError when the node answers a null or a range that
    is not one linked chain."""
    bundles: list[Bundle] = []
    span = batch * parallel
    for start in range(first, last + 1, span):
        end = min(last, start + span - 1)
        got = client.block_bundles(list(range(start, end + 1)), parallel=parallel)
        if any(b is None for b in got):
            raise ValueError(f"the node has no block in {start}..{end}")
        bundles += [b for b in got if b is not None]
    if not ingest.linked([header_of(block) for block, _ in bundles]):
        raise ValueError(f"blocks {first}..{last} are not one linked chain (a reorg while reading)")
    return bundles


def run_chunk(backfill_id: str, start: int, *, store: ObjectStore) -> str:
    settings = current_settings()
    backfill = db.session.get(backfills.Backfill, uuid.UUID(backfill_id))
    if backfill is None or backfill.state != backfills.BackfillState.RUNNING:
        db.session.rollback()
        return "gone"
    chain = get_chain(backfill.chain)
    wanted = list(backfill.datasets)
    end = start + 999
    if backfills.chunk_done(chain.name, wanted, start):
        backfills.record_chunk(backfill.id, start, blocks=0, skipped=True)
        db.session.commit()
        return "skipped"
    urls, chain_id, name = list(chain.rpc_urls), chain.chain_id, chain.name
    db.session.rollback()
    error = ""
    for _ in range(ATTEMPTS):
        try:
            with RpcClient(urls) as client:
                bundles = fetch_range(client, start, end, settings.chain_catchup_batch)
            tables = tables_from_rpc(bundles, chain_id)
            files = cold.write_chunk(store, name, cold.network_name(chain_id), start, end,
                                     {kind: tables[kind] for kind in wanted})
            cold.register_chunks(name, files, "backfill")
            backfills.record_chunk(backfill.id, start, blocks=end - start + 1, skipped=False)
            db.session.commit()
            return "written"
        except (RpcError, MalformedChainData, ValueError, OSError) as exc:
            db.session.rollback()
            error = f"chunk {start}..{end}: {exc}"
            log.warning("backfill %s: %s", backfill_id, error)
    backfills.fail(uuid.UUID(backfill_id), error)
    db.session.commit()
    return "failed"
