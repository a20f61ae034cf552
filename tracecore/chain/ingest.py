"""Writing the hot tables: one PostgreSQL transaction per committed block range, under the
follower's fence, with reorgs applied in the same transaction as the canonical blocks.

The follower (``workers/chain/follower.py``) reads the node and decides what to write; this
module is the only writer of the hot tables. Every write first locks the chain's row and checks
the fence the follower's lease gave it (a follower that lost its lease writes nothing: the
:class:`Fenced` error), then:

* a plain extension (the range starts right above the stored tip and its first parent hash is
  the stored tip's hash) inserts the rows;
* a range that starts at or below the stored tip replaces what it covers (a reorg): the
  orphaned rows from the fork block up are deleted, the canonical ones inserted, a
  ``chain_reorgs`` row records both sides, and the update's window carries
  ``reorg: {fork_block, depth, orphaned_block_hashes}``;
* a reorg whose fork block is at or below the finality boundary (or the cold boundary) is an
  incident: the chain stops (``state = stopped`` with the reason), a ``chain_reorgs`` row marks
  it ``beyond_finality``, and nothing is rewritten, unless an admin's resume allowed a rewrite
  from that height (hot rows only; cold chunks are never rewritten).

Each commit publishes one update of the chain's three datasets (``datasets.publish_update``)
in the same transaction; the caller announces it after the commit.
"""

from __future__ import annotations

import itertools
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

import psycopg
import pyarrow as pa

from tracecore.chain import sql
from tracecore.chain.chains import CHAIN_DATASETS, ChainState
from tracecore.chain.datasets import HOT_TABLES, publish_update
from tracecore.chain.hot import ChainReorg
from tracecore.db.engine import db
from tracecore.exceptions import PlatformError

log = logging.getLogger(__name__)

#: Columns the hot tables hold beyond cryo's (per dataset), filled from the block headers.
_EXTRA = {"blocks": ("parent_hash",)}


class Fenced(PlatformError):
    """This follower's lease moved on (another follower holds the chain): it must stop writing."""

    http_status = 409
    code = "fenced"


class ChainStopped(PlatformError):
    """The chain's ingestion is stopped (a reorg past finality); nothing is written."""

    http_status = 409
    code = "chain_stopped"


@dataclass(frozen=True)
class Header:
    number: int
    hash: bytes
    parent_hash: bytes


@dataclass(frozen=True)
class Lease:
    chain: str
    owner: str
    fence: int


@dataclass
class Committed:
    """What one commit did, for the caller to announce and to measure."""

    first: int
    last: int
    versions: list[tuple[uuid.UUID, int]] = field(default_factory=list)
    reorg: dict[str, Any] | None = None
    stopped: str | None = None


def take_lease(chain: str, owner: str, ttl_s: float) -> Lease | None:
    """Take or renew the chain's lease (commits); None while another follower's lease is live."""
    fence = db.session.execute(sql.TAKE_LEASE, {"chain": chain, "owner": owner, "ttl": ttl_s}).scalar()
    db.session.commit()
    return None if fence is None else Lease(chain, owner, int(fence))


def release_lease(lease: Lease) -> None:
    db.session.execute(sql.RELEASE_LEASE, {"chain": lease.chain, "owner": lease.owner})
    db.session.commit()


def lock_fenced(lease: Lease) -> Any:
    row = db.session.execute(sql.FENCED_CHAIN, {"chain": lease.chain, "owner": lease.owner,
                                                "fence": lease.fence}).one_or_none()
    if row is None:
        db.session.rollback()
        raise Fenced(f"the lease of chain {lease.chain} moved on (fence {lease.fence})")
    if row.state != ChainState.FOLLOWING:
        db.session.rollback()
        raise ChainStopped(f"chain {lease.chain} is stopped")
    return row


def stored_hashes(chain: str, numbers: Sequence[int]) -> dict[int, tuple[bytes, bytes]]:
    """(hash, parent hash) of the stored heights among ``numbers``: one round trip."""
    rows = db.session.execute(sql.STORED_HASHES, {"chain": chain, "numbers": list(numbers)})
    return {int(row.block_number): (bytes(row.block_hash), bytes(row.parent_hash)) for row in rows}


def stored_tip(chain: str) -> Header | None:
    row = db.session.execute(sql.TIP, {"chain": chain}).one_or_none()
    if row is None:
        return None
    hashes = stored_hashes(chain, [row.block_number])
    return Header(int(row.block_number), bytes(row.block_hash), hashes[int(row.block_number)][1])


def linked(headers: Sequence[Header]) -> bool:
    """Consecutive numbers, each block's parent the previous block's hash."""
    return all(b.number == a.number + 1 and b.parent_hash == a.hash for a, b in itertools.pairwise(headers))


def commit(lease: Lease, headers: Sequence[Header], tables: dict[str, pa.Table], *, finalized: int | None,
           head_at: datetime | None = None) -> Committed:
    """Write one contiguous, linked range of blocks (``headers`` ascending; ``tables`` their rows in
    cryo's columns) in one transaction, replacing what it covers; see the module docstring.
    Commits. Raises Fenced, ChainStopped, or ValueError for a range that is not linked."""
    if not headers or not linked(headers):
        raise ValueError("a commit takes a non-empty range of consecutive, linked blocks")
    first, last = headers[0].number, headers[-1].number
    row = lock_fenced(lease)
    below = stored_hashes(lease.chain, [first - 1]).get(first - 1)
    if below is not None and below[0] != headers[0].parent_hash:
        db.session.rollback()
        raise ValueError(f"block {first}'s parent is not the stored block {first - 1}: the fork is lower")
    orphaned = [(int(r.block_number), bytes(r.block_hash)) for r in db.session.execute(
        sql.ORPHANED, {"chain": lease.chain, "first": first})]
    # Heights the range covers with the same hash are not a reorg (a replayed commit).
    new_by_number = {h.number: h.hash for h in headers}
    replaced = [(n, h) for n, h in orphaned if new_by_number.get(n) != h]
    reorg: dict[str, Any] | None = None
    if replaced:
        fork = replaced[0][0]
        depth = sum(1 for n, _ in orphaned if n >= fork)
        reorg = {"fork_block": fork, "depth": depth,
                 "orphaned_block_hashes": ["0x" + h.hex() for n, h in orphaned if n >= fork]}
        boundary = max(finalized if finalized is not None else -1, int(row.cold_boundary))
        rewrite_from = db.session.execute(sql.REWRITE_FROM, {"chain": lease.chain}).scalar()
        allowed = rewrite_from is not None and fork >= rewrite_from and fork > int(row.cold_boundary)
        if fork <= boundary and not allowed:
            return _stop(lease, reorg, headers, boundary)
        db.session.add(ChainReorg(chain=lease.chain, fork_block=fork, depth=reorg["depth"],
                                  old_hashes=reorg["orphaned_block_hashes"],
                                  new_hashes=["0x" + h.hash.hex() for h in headers if h.number >= fork],
                                  beyond_finality=fork <= boundary))
        if allowed:
            db.session.execute(sql.CLEAR_REWRITE, {"chain": lease.chain})
    if orphaned:
        for table in ("chain_logs", "chain_transactions", "chain_blocks"):
            db.session.execute(sql.DELETE_FROM[table], {"chain": lease.chain, "first": first})
    _insert(lease.chain, headers, tables)
    db.session.execute(sql.ADVANCE, {"chain": lease.chain, "last": last, "head_at": head_at})
    window_first = reorg["fork_block"] if reorg else first
    versions = publish_update(lease.chain, window_first, last, reorg=reorg)
    db.session.commit()
    if reorg:
        log.warning("chain %s: reorg at block %s, depth %s, replaced by %s..%s", lease.chain, reorg["fork_block"],
                    reorg["depth"], first, last)
    return Committed(window_first, last, versions, reorg)


def _stop(lease: Lease, reorg: dict[str, Any], headers: Sequence[Header], boundary: int) -> Committed:
    reason = (f"reorg at block {reorg['fork_block']} (depth {reorg['depth']}) reaches below the finality boundary "
              f"{boundary}: ingestion stopped, nothing rewritten; an admin resumes it (POST /v1/chains/"
              f"{lease.chain}/resume)")
    db.session.add(ChainReorg(chain=lease.chain, fork_block=reorg["fork_block"], depth=reorg["depth"],
                              old_hashes=reorg["orphaned_block_hashes"],
                              new_hashes=["0x" + h.hash.hex() for h in headers if h.number >= reorg["fork_block"]],
                              beyond_finality=True))
    db.session.execute(sql.STOP, {"chain": lease.chain, "reason": reason})
    db.session.commit()
    log.error("chain %s: %s", lease.chain, reason)
    return Committed(reorg["fork_block"], headers[-1].number, [], reorg, stopped=reason)


def _insert(chain: str, headers: Sequence[Header], tables: dict[str, pa.Table]) -> None:
    """COPY the rows into the hot tables (the fastest way PostgreSQL takes rows)."""
    cursor = _raw().cursor()
    parents = {h.number: h.parent_hash for h in headers}
    for kind in CHAIN_DATASETS:
        table = tables.get(kind)
        if table is None or table.num_rows == 0:
            continue
        names = list(table.column_names)
        columns = [table.column(name).to_pylist() for name in names]
        extra = _EXTRA.get(kind, ())
        if "parent_hash" in extra:
            numbers = table.column("block_number").to_pylist()
            columns.append([parents[cast(int, n)] for n in numbers])
            names.append("parent_hash")
        listed = ", ".join(f'"{name}"' for name in ["chain", *names])
        with cursor.copy(f"COPY {HOT_TABLES[kind]} ({listed}) FROM STDIN") as copy:
            for values in zip(*columns, strict=True):
                copy.write_row((chain, *values))


def observe(chain: str, *, head: int, head_at: datetime | None, finalized: int | None,
            health: list[dict[str, Any]]) -> None:
    """Record what the node says (head, finalized block, endpoint health). Commits."""
    db.session.execute(sql.OBSERVE, {"chain": chain, "head": head, "head_at": head_at, "finalized": finalized,
                                     "health": json.dumps(health)})
    db.session.commit()


def _raw() -> psycopg.Connection[Any]:
    """The session's own psycopg connection (COPY and plain cursors go through it, in its transaction)."""
    return cast("psycopg.Connection[Any]", db.session.connection().connection.driver_connection)
