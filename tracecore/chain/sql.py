"""The chain room's SQL that matters, in one place: the follower's lease and fence, the hot
path's writes, reorg lookups, compaction and pruning, backfill progress."""

from __future__ import annotations

from sqlalchemy import text

# -- the follower's lease -------------------------------------------------------------------

#: Take (or renew) a chain's lease; a new owner bumps the fence. Answers the fence, or nothing
#: while another owner's lease is live.
TAKE_LEASE = text("""
UPDATE chains
SET fence = CASE WHEN lease_owner IS DISTINCT FROM :owner THEN fence + 1 ELSE fence END,
    lease_owner = :owner, lease_expires_at = now() + make_interval(secs => :ttl)
WHERE name = :chain
  AND (lease_owner IS NULL OR lease_owner = :owner OR lease_expires_at < now())
RETURNING fence
""")

#: The writer's check at the start of every write transaction: locks the chain row (writers of
#: one chain serialize on it) and answers it only while this owner's fence is current and its
#: lease live.
FENCED_CHAIN = text("""
SELECT name, state, cold_boundary, ingested_block, start_block
FROM chains
WHERE name = :chain AND lease_owner = :owner AND fence = :fence AND lease_expires_at > now()
FOR UPDATE
""")

RELEASE_LEASE = text("""
UPDATE chains SET lease_owner = NULL, lease_expires_at = NULL WHERE name = :chain AND lease_owner = :owner
""")

# -- the hot path ---------------------------------------------------------------------------

#: Stored hashes of the given heights (the fork-point lookup: one round trip).
STORED_HASHES = text("""
SELECT block_number, block_hash, parent_hash FROM chain_blocks
WHERE chain = :chain AND block_number = ANY(:numbers)
""")

TIP = text("""
SELECT block_number, block_hash FROM chain_blocks WHERE chain = :chain ORDER BY block_number DESC LIMIT 1
""")

DELETE_FROM = {
    table: text(f"DELETE FROM {table} WHERE chain = :chain AND block_number >= :first")
    for table in ("chain_logs", "chain_transactions", "chain_blocks")
}

ORPHANED = text("""
SELECT block_number, block_hash FROM chain_blocks
WHERE chain = :chain AND block_number >= :first ORDER BY block_number
""")

ADVANCE = text("""
UPDATE chains
SET ingested_block = :last, ingested_at = now(),
    head = GREATEST(coalesce(head, :last), :last),
    head_at = CASE WHEN head IS NULL OR :last >= head THEN coalesce(CAST(:head_at AS timestamptz), now())
                   ELSE head_at END
WHERE name = :chain
""")

OBSERVE = text("""
UPDATE chains SET head = :head, head_at = coalesce(CAST(:head_at AS timestamptz), now()),
                  finalized_block = coalesce(CAST(:finalized AS bigint), finalized_block),
                  health = CAST(:health AS jsonb)
WHERE name = :chain
""")

REWRITE_FROM = text("SELECT rewrite_from FROM chains WHERE name = :chain")
CLEAR_REWRITE = text("UPDATE chains SET rewrite_from = NULL WHERE name = :chain")
RESUME = text("""
UPDATE chains SET state = 'following', stopped_reason = NULL, rewrite_from = :rewrite_from
WHERE name = :chain AND state = 'stopped'
RETURNING name
""")

STOP = text("""
UPDATE chains SET state = 'stopped', stopped_reason = :reason WHERE name = :chain
""")

# -- completeness ---------------------------------------------------------------------------

#: Heights missing from the hot tables between ``first`` and ``last`` (bounded).
HOT_GAPS = text("""
SELECT n FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS n
WHERE NOT EXISTS (SELECT 1 FROM chain_blocks WHERE chain = :chain AND block_number = n)
ORDER BY n LIMIT :most
""")

#: Broken parent links among hot blocks (a child whose parent hash is not its parent's hash).
BROKEN_LINKS = text("""
SELECT c.block_number FROM chain_blocks AS c JOIN chain_blocks AS p
  ON p.chain = c.chain AND p.block_number = c.block_number - 1
WHERE c.chain = :chain AND c.parent_hash <> p.block_hash
ORDER BY c.block_number LIMIT :most
""")

SET_COMPLETENESS = text("UPDATE chains SET completeness = CAST(:result AS jsonb) WHERE name = :chain")

#: Cold coverage: chunk starts of one dataset, in order.
CHUNK_RANGES = text("""
SELECT start_block, end_block FROM chain_chunks WHERE chain = :chain AND dataset = :dataset ORDER BY start_block
""")

# -- compaction -----------------------------------------------------------------------------

CHAIN_STATE = text("SELECT cold_boundary, ingested_block, start_block, finalized_block FROM chains WHERE name = :chain")

HOT_HEADERS = text("""
SELECT block_number, block_hash, parent_hash FROM chain_blocks
WHERE chain = :chain AND block_number BETWEEN :first AND :last ORDER BY block_number
""")

CHUNK_DATASETS_AT = text("SELECT dataset FROM chain_chunks WHERE chain = :chain AND start_block = :start")

MOVE_COLD_BOUNDARY = text(
    "UPDATE chains SET cold_boundary = :boundary WHERE name = :chain AND cold_boundary < :boundary")

#: Prune hot rows that cold chunks hold, once the chunk is older than the grace period (a query
#: pinned before the chunk committed still reads those rows from the hot tables).
PRUNABLE_THROUGH = text("""
SELECT max(end_block) FROM chain_chunks
WHERE chain = :chain AND dataset = 'blocks' AND end_block <= :cold_boundary
  AND created_at < now() - make_interval(secs => :grace)
""")

PRUNE = {
    table: text(f"DELETE FROM {table} WHERE chain = :chain AND block_number <= :through")
    for table in ("chain_logs", "chain_transactions", "chain_blocks")
}

# -- backfills ------------------------------------------------------------------------------

BACKFILL_CHUNK_DONE = text("""
INSERT INTO chain_backfill_chunks (backfill_id, start_block) VALUES (:id, :start)
ON CONFLICT DO NOTHING RETURNING start_block
""")

BACKFILL_PROGRESS = text("""
UPDATE chain_backfills
SET chunks_done = chunks_done + 1, chunks_skipped = chunks_skipped + :skipped, blocks_done = blocks_done + :blocks,
    state = CASE WHEN chunks_done + 1 >= chunks_total AND state = 'running' THEN 'done' ELSE state END,
    finished_at = CASE WHEN chunks_done + 1 >= chunks_total THEN now() ELSE finished_at END
WHERE id = :id
""")
