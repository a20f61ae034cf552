"""Registered chains: their RPC endpoints, finality rule and ingestion state.

A chain's row is also its follower's lease (``lease_owner``, ``lease_expires_at``, ``fence``):
exactly one follower writes a chain at a time, and every write checks the fence it took, as a
task's writes do. The row holds what ``GET /v1/chains/{name}`` shows: head, last ingested
block, the finalized block, the cold boundary ``C`` (every block at or below it lives in cold
Parquet chunks, every block above it in the hot tables), RPC endpoint health, the last
completeness check, and whether ingestion stopped (a reorg past finality) and why.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import BigInteger, CheckConstraint, DateTime, String, Text, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from tracecore.db.engine import Base, created_at, db, uuid_pk
from tracecore.exceptions import NotFound, ValidationError

CHAIN_NAME_RE = re.compile(r"[a-z][a-z0-9]{0,31}")
CHUNK_BLOCKS = 1000  # cold chunks are aligned 1000-block ranges, as cryo's default chunk size
CHAIN_DATASETS = ("blocks", "transactions", "logs")  # each chain's datasets are <chain>_<one of these>
MAX_RPC_URLS = 8
MAX_FINALITY_DEPTH = 100_000


class ChainState(StrEnum):
    FOLLOWING = "following"
    STOPPED = "stopped"  # a reorg deeper than finality: nothing is rewritten until an admin acts


class Chain(Base):
    __tablename__ = "chains"
    __table_args__ = (
        CheckConstraint("state IN ('following', 'stopped')", name="state"),
        CheckConstraint("chain_id >= 0", name="chain_id"),
        CheckConstraint("start_block >= 0", name="start_block"),
        CheckConstraint("cold_boundary >= -1", name="cold_boundary"),
        CheckConstraint("fence >= 0", name="fence"),
    )
    id: Mapped[uuid.UUID] = uuid_pk()
    name: Mapped[str] = mapped_column(String(32), unique=True, nullable=False)
    chain_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    rpc_urls: Mapped[list[str]] = mapped_column(JSONB, nullable=False)
    ws_url: Mapped[str | None] = mapped_column(Text)
    # {"tag": "finalized"} or {"depth": N}
    finality: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    start_block: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    state: Mapped[str] = mapped_column(String(16), nullable=False, default=ChainState.FOLLOWING)
    stopped_reason: Mapped[str | None] = mapped_column(Text)
    # Set by an admin's resume after a reorg past finality: a fork at or above it may rewrite
    # hot rows once (cold chunks are never rewritten); cleared when that reorg is applied.
    rewrite_from: Mapped[int | None] = mapped_column(BigInteger)
    head: Mapped[int | None] = mapped_column(BigInteger)
    head_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ingested_block: Mapped[int | None] = mapped_column(BigInteger)
    ingested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finalized_block: Mapped[int | None] = mapped_column(BigInteger)
    cold_boundary: Mapped[int] = mapped_column(BigInteger, nullable=False, default=-1)
    health: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, nullable=False, default=list)
    completeness: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    fence: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    created_at: Mapped[datetime] = created_at()


@dataclass(frozen=True)
class ChainSpec:
    """A validated registration: what ``POST /v1/chains`` and ``TRACE_CHAINS`` carry."""

    name: str
    chain_id: int
    rpc_urls: tuple[str, ...]
    ws_url: str | None
    finality: dict[str, Any]
    start_block: int


def _url(value: Any, path: str, schemes: tuple[str, ...]) -> str:
    if not isinstance(value, str) or len(value) > 2048:
        raise ValidationError("a URL is a string of at most 2048 characters", path=path)
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.hostname:
        raise ValidationError(f"{value!r} is not a {' or '.join(schemes)} URL", path=path, code="invalid_url")
    return value


def _int(value: Any, path: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValidationError(f"{path} must be an integer from {low} to {high}", path=path)
    return value


def parse_spec(body: Any) -> ChainSpec:
    """Validate a registration; every problem is a ValidationError naming its field."""
    if not isinstance(body, Mapping):
        raise ValidationError("a chain is a JSON object", path="")
    unknown = set(body) - {"name", "chain_id", "rpc_urls", "ws_url", "finality", "start_block"}
    if unknown:
        names = sorted(map(str, unknown))
        raise ValidationError(f"unknown field(s): {', '.join(names)}", path=names[0], code="unknown_field")
    name = body.get("name")
    if not isinstance(name, str) or not CHAIN_NAME_RE.fullmatch(name):
        raise ValidationError("name must match ^[a-z][a-z0-9]{0,31}$ (it prefixes the chain's dataset names)",
                              path="name")
    chain_id = _int(body.get("chain_id"), "chain_id", 0, 2**63 - 1)
    urls = body.get("rpc_urls")
    if not isinstance(urls, list) or not 1 <= len(urls) <= MAX_RPC_URLS:
        raise ValidationError(f"rpc_urls is a list of 1 to {MAX_RPC_URLS} http(s) URLs", path="rpc_urls")
    rpc_urls = tuple(_url(url, f"rpc_urls[{i}]", ("http", "https")) for i, url in enumerate(urls))
    ws_url = body.get("ws_url")
    if ws_url is not None:
        ws_url = _url(ws_url, "ws_url", ("ws", "wss"))
    finality = body.get("finality", {"depth": 64})
    if not isinstance(finality, Mapping) or len(finality) != 1:
        raise ValidationError('finality is {"tag": "finalized"} or {"depth": N}', path="finality")
    if "tag" in finality:
        if finality["tag"] not in ("finalized", "safe"):
            raise ValidationError('finality.tag is "finalized" or "safe"', path="finality.tag")
        finality = {"tag": finality["tag"]}
    elif "depth" in finality:
        finality = {"depth": _int(finality["depth"], "finality.depth", 0, MAX_FINALITY_DEPTH)}
    else:
        raise ValidationError('finality is {"tag": "finalized"} or {"depth": N}', path="finality")
    start_block = _int(body.get("start_block", 0), "start_block", 0, 2**40)
    return ChainSpec(name, chain_id, rpc_urls, ws_url, dict(finality), start_block)


def get_chain(name: str) -> Chain:
    chain = db.session.scalar(select(Chain).where(Chain.name == name)) if isinstance(name, str) else None
    if chain is None:
        raise NotFound(f"no chain named {name!r}")
    return chain


def list_chains() -> list[Chain]:
    return list(db.session.scalars(select(Chain).order_by(Chain.name)))


def finality_depth(chain: Chain) -> int | None:
    depth = chain.finality.get("depth")
    return int(depth) if depth is not None else None


def status(chain: Chain, *, now: datetime, last_reorg: Mapping[str, Any] | None) -> dict[str, Any]:
    """What ``GET /v1/chains/{name}`` answers."""
    lag_blocks = None if chain.head is None else chain.head - (chain.ingested_block if chain.ingested_block is not None
                                                               else chain.start_block - 1)
    lag_ms = None
    if chain.head_at is not None and chain.ingested_block is not None and lag_blocks and lag_blocks > 0:
        lag_ms = round((now - chain.head_at).total_seconds() * 1000, 1)
    elif lag_blocks == 0:
        lag_ms = 0.0
    return {
        "name": chain.name, "chain_id": chain.chain_id, "rpc_urls": list(chain.rpc_urls), "ws_url": chain.ws_url,
        "finality": chain.finality, "start_block": chain.start_block, "state": chain.state,
        "stopped_reason": chain.stopped_reason, "head": chain.head,
        "head_at": chain.head_at.isoformat() if chain.head_at else None,
        "ingested_block": chain.ingested_block,
        "ingested_at": chain.ingested_at.isoformat() if chain.ingested_at else None,
        "lag_blocks": lag_blocks, "lag_ms": lag_ms, "finalized_block": chain.finalized_block,
        "cold_boundary": chain.cold_boundary, "last_reorg": last_reorg, "rpc_health": chain.health,
        "completeness": chain.completeness,
        "follower": {"owner": chain.lease_owner,
                     "lease_expires_at": chain.lease_expires_at.isoformat() if chain.lease_expires_at else None},
        "datasets": [f"{chain.name}_{kind}" for kind in ("blocks", "transactions", "logs")],
        "created_at": chain.created_at.isoformat(),
    }
