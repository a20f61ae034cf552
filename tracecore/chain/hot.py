"""The hot tables: a chain's blocks above its cold boundary, mutable because reorgs replace them.

One table per dataset, shared by every chain (``chain`` names it), with cryo 0.3.2's columns
(``tracecore.chain.cryo``) in PostgreSQL types: binary columns are ``bytea``, unsigned 64-bit
quantities that fit a signed ``bigint`` in practice (numbers, gas, nonces, timestamps) are
``bigint``, fees and prices are ``numeric(20, 0)`` so a uint64 never overflows. Blocks also keep
``parent_hash``: reorgs are detected by parent links, never by the node's say-so. Rows are
written only by the chain's follower (or the gap filler), under the chain's fence.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Integer,
    LargeBinary,
    Numeric,
    String,
    Text,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from tracecore.db.engine import Base, created_at, uuid_pk

U64 = Numeric(20, 0)


def _chain() -> Mapped[str]:
    return mapped_column(String(32), ForeignKey("chains.name", ondelete="CASCADE", onupdate="CASCADE"),
                         primary_key=True)


class ChainBlock(Base):
    __tablename__ = "chain_blocks"
    chain: Mapped[str] = _chain()
    block_number: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    block_hash: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    parent_hash: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    author: Mapped[bytes | None] = mapped_column(LargeBinary)
    gas_used: Mapped[int | None] = mapped_column(BigInteger)
    extra_data: Mapped[bytes | None] = mapped_column(LargeBinary)
    timestamp: Mapped[int | None] = mapped_column(BigInteger)
    base_fee_per_gas: Mapped[Any] = mapped_column(U64, nullable=True)
    chain_id: Mapped[int | None] = mapped_column(BigInteger)
    ingested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False,
                                                  server_default=func.now())


class ChainTransaction(Base):
    __tablename__ = "chain_transactions"
    chain: Mapped[str] = _chain()
    block_number: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    transaction_index: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    transaction_hash: Mapped[bytes | None] = mapped_column(LargeBinary)
    nonce: Mapped[int | None] = mapped_column(BigInteger)
    from_address: Mapped[bytes | None] = mapped_column(LargeBinary)
    to_address: Mapped[bytes | None] = mapped_column(LargeBinary)
    value_binary: Mapped[bytes | None] = mapped_column(LargeBinary)
    value_string: Mapped[str | None] = mapped_column(Text)
    value_f64: Mapped[float | None] = mapped_column(Double)
    input: Mapped[bytes | None] = mapped_column(LargeBinary)
    gas_limit: Mapped[int | None] = mapped_column(BigInteger)
    gas_used: Mapped[int | None] = mapped_column(BigInteger)
    gas_price: Mapped[Any] = mapped_column(U64, nullable=True)
    transaction_type: Mapped[int | None] = mapped_column(BigInteger)
    max_priority_fee_per_gas: Mapped[Any] = mapped_column(U64, nullable=True)
    max_fee_per_gas: Mapped[Any] = mapped_column(U64, nullable=True)
    success: Mapped[bool | None] = mapped_column(Boolean)
    n_input_bytes: Mapped[int | None] = mapped_column(BigInteger)
    n_input_zero_bytes: Mapped[int | None] = mapped_column(BigInteger)
    n_input_nonzero_bytes: Mapped[int | None] = mapped_column(BigInteger)
    chain_id: Mapped[int | None] = mapped_column(BigInteger)


class ChainLog(Base):
    __tablename__ = "chain_logs"
    chain: Mapped[str] = _chain()
    block_number: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    log_index: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    transaction_index: Mapped[int | None] = mapped_column(BigInteger)
    transaction_hash: Mapped[bytes | None] = mapped_column(LargeBinary)
    address: Mapped[bytes | None] = mapped_column(LargeBinary)
    topic0: Mapped[bytes | None] = mapped_column(LargeBinary)
    topic1: Mapped[bytes | None] = mapped_column(LargeBinary)
    topic2: Mapped[bytes | None] = mapped_column(LargeBinary)
    topic3: Mapped[bytes | None] = mapped_column(LargeBinary)
    data: Mapped[bytes | None] = mapped_column(LargeBinary)
    chain_id: Mapped[int | None] = mapped_column(BigInteger)


class ChainReorg(Base):
    """One reorg as the follower saw it: where the chains forked and what was replaced."""

    __tablename__ = "chain_reorgs"
    __table_args__ = (CheckConstraint("depth >= 1", name="depth"),)
    id: Mapped[uuid.UUID] = uuid_pk()
    chain: Mapped[str] = mapped_column(String(32), ForeignKey("chains.name", ondelete="CASCADE",
                                                              onupdate="CASCADE"), nullable=False, index=True)
    fork_block: Mapped[int] = mapped_column(BigInteger, nullable=False)  # the first replaced height
    depth: Mapped[int] = mapped_column(Integer, nullable=False)
    old_hashes: Mapped[list[str]] = mapped_column(JSONB, nullable=False)
    new_hashes: Mapped[list[str]] = mapped_column(JSONB, nullable=False)
    beyond_finality: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    detected_at: Mapped[datetime] = created_at()


class ChainChunk(Base):
    """A cold chunk: one immutable Parquet file of one dataset over an aligned block range."""

    __tablename__ = "chain_chunks"
    __table_args__ = (
        CheckConstraint("dataset IN ('blocks', 'transactions', 'logs')", name="dataset"),
        CheckConstraint("end_block >= start_block AND start_block >= 0", name="range"),
        CheckConstraint("origin IN ('compaction', 'backfill')", name="origin"),
    )
    chain: Mapped[str] = _chain()
    dataset: Mapped[str] = mapped_column(String(16), primary_key=True)
    start_block: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    end_block: Mapped[int] = mapped_column(BigInteger, nullable=False)
    key: Mapped[str] = mapped_column(Text, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    rows: Mapped[int] = mapped_column(BigInteger, nullable=False)
    bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    origin: Mapped[str] = mapped_column(String(16), nullable=False)
    created_at: Mapped[datetime] = created_at()
