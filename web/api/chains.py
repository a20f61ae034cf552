"""Chains: register a chain (installation admin), read its ingestion status and reorgs, backfill
its history into cold chunks. Chain data itself is read through /v1/query as the datasets
``<chain>_blocks``, ``<chain>_transactions`` and ``<chain>_logs``."""

from __future__ import annotations

import uuid
from typing import Any

from flask import current_app
from flask.typing import ResponseReturnValue
from marshmallow import Schema, fields, validate
from sqlalchemy import func, select

from tracecore.chain import backfills, chains, registration
from tracecore.chain import sql as chain_sql
from tracecore.chain.hot import ChainReorg
from tracecore.db.engine import db
from tracecore.exceptions import Conflict, NotFound
from tracecore.tenancy import audit
from workers.app import enqueue_backfill

from ..auth import current, installation_admin
from . import Blueprint

blp = Blueprint("chains", __name__, url_prefix="/v1",
                description="Chains Trace follows: their tip, reorgs, finality, cold chunks and backfills")


class Finality(Schema):
    tag = fields.String(validate=[validate.Length(1, 16), validate.OneOf(["finalized", "safe"])])
    depth = fields.Integer(strict=True, validate=validate.Range(0, chains.MAX_FINALITY_DEPTH))


class ChainCreate(Schema):
    name = fields.String(required=True, validate=validate.Length(1, 32),
                         metadata={"description": "^[a-z][a-z0-9]{0,31}$; prefixes the datasets"})
    chain_id = fields.Integer(required=True, strict=True, validate=validate.Range(0, 2**63 - 1))
    rpc_urls = fields.List(fields.String(validate=validate.Length(1, 2048)), required=True,
                           validate=validate.Length(1, chains.MAX_RPC_URLS),
                           metadata={"description": "HTTP(S) JSON-RPC endpoints, in order of preference"})
    ws_url = fields.String(allow_none=True, validate=validate.Length(1, 2048),
                           metadata={"description": "WebSocket endpoint for newHeads"})
    finality = fields.Nested(Finality, metadata={"description": '{"tag": "finalized"} or {"depth": N} (default 64)'})
    start_block = fields.Integer(strict=True, validate=validate.Range(0, 2**40),
                                 metadata={"description": "First block followed (rounded down to a 1000-block chunk)"})


class ChainOut(Schema):
    name = fields.String()
    chain_id = fields.Integer()
    rpc_urls = fields.List(fields.String())
    ws_url = fields.String(allow_none=True)
    finality = fields.Dict()
    start_block = fields.Integer()
    state = fields.String(metadata={"description": "following | stopped (a reorg past finality)"})
    stopped_reason = fields.String(allow_none=True)
    head = fields.Integer(allow_none=True)
    head_at = fields.String(allow_none=True)
    ingested_block = fields.Integer(allow_none=True)
    ingested_at = fields.String(allow_none=True)
    lag_blocks = fields.Integer(allow_none=True)
    lag_ms = fields.Float(allow_none=True)
    finalized_block = fields.Integer(allow_none=True)
    cold_boundary = fields.Integer(metadata={"description": "Every block at or below it is in cold Parquet chunks"})
    last_reorg = fields.Dict(allow_none=True)
    rpc_health = fields.List(fields.Dict())
    completeness = fields.Dict(allow_none=True)
    follower = fields.Dict()
    datasets = fields.List(fields.String())
    created_at = fields.String()


class ReorgOut(Schema):
    fork_block = fields.Integer()
    depth = fields.Integer()
    old_hashes = fields.List(fields.String())
    new_hashes = fields.List(fields.String())
    beyond_finality = fields.Boolean()
    detected_at = fields.String()


class ReorgQuery(Schema):
    limit = fields.Integer(load_default=100, validate=validate.Range(1, 1000))


class ResumeIn(Schema):
    rewrite_from = fields.Integer(allow_none=True, load_default=None, validate=validate.Range(0, 2**40),
                                  metadata={"description": "Allow one reorg from this height to rewrite hot rows"})


class BackfillCreate(Schema):
    from_block = fields.Integer(required=True, strict=True, validate=validate.Range(0, 2**40))
    to_block = fields.Integer(required=True, strict=True, validate=validate.Range(0, 2**40))
    datasets = fields.List(fields.String(validate=validate.Length(1, 16)), load_default=None,
                           validate=validate.Length(1, 3))


class BackfillOut(Schema):
    id = fields.String()
    chain = fields.String()
    from_block = fields.Integer()
    to_block = fields.Integer()
    datasets = fields.List(fields.String())
    state = fields.String()
    chunks_done = fields.Integer()
    chunks_total = fields.Integer()
    chunks_skipped = fields.Integer()
    blocks_written = fields.Integer()
    blocks_per_s = fields.Float()
    eta_s = fields.Float(allow_none=True)
    error = fields.String(allow_none=True)
    created_at = fields.String()
    finished_at = fields.String(allow_none=True)


def _reorg_json(reorg: ChainReorg) -> dict[str, Any]:
    return {"fork_block": reorg.fork_block, "depth": reorg.depth, "old_hashes": reorg.old_hashes,
            "new_hashes": reorg.new_hashes, "beyond_finality": reorg.beyond_finality,
            "detected_at": reorg.detected_at.isoformat()}


def _status(chain: chains.Chain) -> dict[str, Any]:
    last = db.session.scalar(select(ChainReorg).where(ChainReorg.chain == chain.name)
                             .order_by(ChainReorg.detected_at.desc()).limit(1))
    now = db.session.execute(select(func.now())).scalar_one()
    return chains.status(chain, now=now, last_reorg=_reorg_json(last) if last else None)


@blp.route("/chains", methods=["POST"])
@blp.arguments(ChainCreate)
@blp.response(201, ChainOut)
def create_chain(body: dict[str, Any]) -> ResponseReturnValue:
    principal = installation_admin()
    chain = registration.register(chains.parse_spec(body))
    audit.record(org_id=principal.org_id, actor_id=principal.user_id, action="chain.create", object_type="chain",
                 object_id=chain.id, name=chain.name)
    db.session.commit()
    return _status(chain)


@blp.route("/chains")
@blp.response(200, ChainOut(many=True))
def list_chains() -> ResponseReturnValue:
    current()
    return [_status(chain) for chain in chains.list_chains()]


@blp.route("/chains/<name>")
@blp.response(200, ChainOut)
def get_chain(name: str) -> ResponseReturnValue:
    current()
    return _status(chains.get_chain(name))


@blp.route("/chains/<name>/reorgs")
@blp.arguments(ReorgQuery, location="query")
@blp.response(200, ReorgOut(many=True))
def list_reorgs(query: dict[str, Any], name: str) -> ResponseReturnValue:
    current()
    chain = chains.get_chain(name)
    found = db.session.scalars(select(ChainReorg).where(ChainReorg.chain == chain.name)
                               .order_by(ChainReorg.detected_at.desc()).limit(query["limit"]))
    return [_reorg_json(reorg) for reorg in found]


@blp.route("/chains/<name>/resume", methods=["POST"])
@blp.arguments(ResumeIn)
@blp.response(200, ChainOut)
def resume_chain(body: dict[str, Any], name: str) -> ResponseReturnValue:
    """After a reorg past finality: follow again; ``rewrite_from`` lets that reorg rewrite hot rows."""
    principal = installation_admin()
    chain = chains.get_chain(name)
    if db.session.execute(chain_sql.RESUME, {"chain": name, "rewrite_from": body["rewrite_from"]}).scalar() is None:
        raise Conflict(f"chain {name} is not stopped", code="not_stopped")
    audit.record(org_id=principal.org_id, actor_id=principal.user_id, action="chain.resume", object_type="chain",
                 object_id=chain.id, rewrite_from=body["rewrite_from"])
    db.session.commit()
    db.session.refresh(chain)
    return _status(chain)


@blp.route("/chains/<name>/backfills", methods=["POST"])
@blp.arguments(BackfillCreate)
@blp.response(202, BackfillOut)
def create_backfill(body: dict[str, Any], name: str) -> ResponseReturnValue:
    principal = installation_admin()
    chain = chains.get_chain(name)
    backfill = backfills.plan(chain, body["from_block"], body["to_block"], body["datasets"])
    backfill.created_by = principal.user_id
    audit.record(org_id=principal.org_id, actor_id=principal.user_id, action="chain.backfill", object_type="chain",
                 object_id=chain.id, backfill_id=str(backfill.id), from_block=backfill.from_block,
                 to_block=backfill.to_block)
    db.session.commit()
    for start, _ in backfills.aligned_chunks(backfill.from_block, backfill.to_block):
        enqueue_backfill(current_app, backfill.id, start)
    now = db.session.execute(select(func.now())).scalar_one()
    return backfills.progress(backfill, now=now)


@blp.route("/backfills/<backfill_id>")
@blp.response(200, BackfillOut)
def get_backfill(backfill_id: str) -> ResponseReturnValue:
    current()
    try:
        key = uuid.UUID(backfill_id)
    except ValueError:
        raise NotFound("no such backfill") from None
    backfill = db.session.get(backfills.Backfill, key)
    if backfill is None:
        raise NotFound("no such backfill")
    now = db.session.execute(select(func.now())).scalar_one()
    return backfills.progress(backfill, now=now)

