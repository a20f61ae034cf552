"""Backfills: history written straight to cold chunks, one task per aligned 1000-block chunk.

A backfill is a row with its plan (the aligned chunks of ``[from_block, to_block]`` that are
at or below the finality boundary) and its progress. Each chunk is a task of its own
(``workers/chain/backfill.py``); a chunk whose three files are already registered
(``chain_chunks``) is skipped, so a backfill resumes where it stopped and a second backfill of
the same range writes nothing. Chunks below the cold boundary join the cold view as soon as
they are registered.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    Uuid,
    func,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from tracecore.chain import sql
from tracecore.chain.chains import CHAIN_DATASETS as DATASETS
from tracecore.chain.chains import CHUNK_BLOCKS, Chain, ChainState
from tracecore.chain.hot import ChainChunk
from tracecore.db.engine import Base, created_at, db, uuid_pk
from tracecore.exceptions import Conflict, ValidationError

MAX_BACKFILL_CHUNKS = 100_000


class BackfillState(StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class Backfill(Base):
    __tablename__ = "chain_backfills"
    __table_args__ = (
        CheckConstraint("state IN ('running', 'done', 'failed')", name="state"),
        CheckConstraint("to_block >= from_block AND from_block >= 0", name="range"),
        CheckConstraint("chunks_done >= 0 AND chunks_done <= chunks_total", name="progress"),
    )
    id: Mapped[uuid.UUID] = uuid_pk()
    chain: Mapped[str] = mapped_column(String(32), ForeignKey("chains.name", ondelete="CASCADE",
                                                              onupdate="CASCADE"), nullable=False, index=True)
    from_block: Mapped[int] = mapped_column(BigInteger, nullable=False)
    to_block: Mapped[int] = mapped_column(BigInteger, nullable=False)
    datasets: Mapped[list[str]] = mapped_column(JSONB, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False, default=BackfillState.RUNNING)
    chunks_total: Mapped[int] = mapped_column(Integer, nullable=False)
    chunks_done: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    chunks_skipped: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    blocks_done: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = created_at()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


def aligned_chunks(from_block: int, to_block: int) -> list[tuple[int, int]]:
    """The aligned chunks that cover ``[from_block, to_block]`` (inclusive), each (start, end)."""
    first = from_block - from_block % CHUNK_BLOCKS
    return [(start, start + CHUNK_BLOCKS - 1) for start in range(first, to_block + 1, CHUNK_BLOCKS)]


def plan(chain: Chain, from_block: Any, to_block: Any, datasets: Any) -> Backfill:
    """Validate a request and record the backfill (flushes). Only whole chunks at or below the
    finality boundary are written: a chunk is immutable, so it waits for finality."""
    for name, value in (("from_block", from_block), ("to_block", to_block)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**40:
            raise ValidationError(f"{name} must be an integer from 0 to 2^40", path=name)
    if to_block < from_block:
        raise ValidationError("to_block must be at least from_block", path="to_block")
    wanted = list(DATASETS) if datasets is None else datasets
    if not isinstance(wanted, list) or not wanted or any(d not in DATASETS for d in wanted):
        raise ValidationError(f"datasets is a non-empty list of {', '.join(DATASETS)}", path="datasets")
    if chain.state != ChainState.FOLLOWING:
        raise Conflict(f"chain {chain.name} is stopped: {chain.stopped_reason}", code="chain_stopped")
    chunks = aligned_chunks(from_block, to_block)
    if len(chunks) > MAX_BACKFILL_CHUNKS:
        raise ValidationError(f"at most {MAX_BACKFILL_CHUNKS} chunks per backfill", path="to_block")
    final = chain.finalized_block
    if final is None or chunks[-1][1] > final:
        raise ValidationError(f"the chunk ending at {chunks[-1][1]} is above the finality boundary "
                              f"({final if final is not None else 'not known yet'}); backfill up to it",
                              path="to_block", code="beyond_finality")
    backfill = Backfill(chain=chain.name, from_block=chunks[0][0], to_block=chunks[-1][1],
                        datasets=sorted(set(wanted), key=DATASETS.index), state=BackfillState.RUNNING,
                        chunks_total=len(chunks), chunks_done=0, chunks_skipped=0, blocks_done=0)
    db.session.add(backfill)
    db.session.flush()
    return backfill


def chunk_done(chain: str, datasets: Sequence[str], start: int) -> bool:
    """Every requested dataset of the chunk starting at ``start`` is registered already."""
    found = set(db.session.scalars(select(ChainChunk.dataset).where(
        ChainChunk.chain == chain, ChainChunk.start_block == start, ChainChunk.dataset.in_(list(datasets)))))
    return found >= set(datasets)


def record_chunk(backfill_id: uuid.UUID, start: int, *, blocks: int, skipped: bool) -> bool:
    """Count one finished chunk once (a redelivered chunk task counts nothing); the last one
    closes the backfill. Answers whether this call counted it. Flushes, never commits."""
    counted = db.session.execute(sql.BACKFILL_CHUNK_DONE, {"id": backfill_id, "start": start}).scalar()
    if counted is None:
        return False
    db.session.execute(sql.BACKFILL_PROGRESS, {"id": backfill_id, "blocks": blocks, "skipped": int(skipped)})
    return True


def fail(backfill_id: uuid.UUID, error: str) -> None:
    db.session.execute(update(Backfill).where(Backfill.id == backfill_id, Backfill.state == BackfillState.RUNNING)
                       .values(state=BackfillState.FAILED, error=error[:2000], finished_at=func.now()))


def progress(backfill: Backfill, *, now: datetime) -> dict[str, Any]:
    """What ``GET /v1/backfills/{id}`` answers: chunks done of total, blocks/s, ETA."""
    elapsed = max(((backfill.finished_at or now) - backfill.created_at).total_seconds(), 1e-3)
    written = backfill.blocks_done
    rate = written / elapsed
    left = backfill.chunks_total - backfill.chunks_done
    per_chunk = elapsed / max(backfill.chunks_done, 1)
    return {"id": str(backfill.id), "chain": backfill.chain, "from_block": backfill.from_block,
            "to_block": backfill.to_block, "datasets": backfill.datasets, "state": backfill.state,
            "chunks_done": backfill.chunks_done, "chunks_total": backfill.chunks_total,
            "chunks_skipped": backfill.chunks_skipped, "blocks_written": written,
            "blocks_per_s": round(rate, 1), "eta_s": None if backfill.state != BackfillState.RUNNING
            or backfill.chunks_done == 0 else round(left * per_chunk, 1), "error": backfill.error,
            "created_at": backfill.created_at.isoformat(),
            "finished_at": backfill.finished_at.isoformat() if backfill.finished_at else None}


class BackfillChunk(Base):
    """A chunk of a backfill counted as finished (so a redelivered task counts it once)."""

    __tablename__ = "chain_backfill_chunks"
    backfill_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("chain_backfills.id", ondelete="CASCADE"),
                                                   primary_key=True)
    start_block: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    done_at: Mapped[datetime] = created_at()
