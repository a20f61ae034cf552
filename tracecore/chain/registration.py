"""Registering chains: ``POST /v1/chains`` and ``TRACE_CHAINS`` both come here, so a chain is
always registered with its three datasets in the same transaction."""

from __future__ import annotations

import json
import uuid

from sqlalchemy.dialects.postgresql import insert

from tracecore.chain.chains import CHUNK_BLOCKS, Chain, ChainSpec, ChainState, get_chain, parse_spec
from tracecore.chain.datasets import declare_chain_datasets
from tracecore.db.engine import db
from tracecore.exceptions import Conflict, ValidationError


def register(spec: ChainSpec, *, replace: bool = False) -> Chain:
    """Create the chain (409 ``chain_exists`` if named already, unless ``replace``, which updates
    its endpoints and finality and keeps its data). Flushes; the caller commits."""
    values = {"chain_id": spec.chain_id, "rpc_urls": list(spec.rpc_urls), "ws_url": spec.ws_url,
              "finality": spec.finality}
    start = spec.start_block - spec.start_block % CHUNK_BLOCKS  # chunks are aligned: so is the start
    statement = insert(Chain).values(id=uuid.uuid4(), name=spec.name, start_block=start,
                                     cold_boundary=start - 1, state=ChainState.FOLLOWING, health=[],
                                     fence=0, **values)
    if replace:
        statement = statement.on_conflict_do_update(index_elements=["name"], set_=values)
    else:
        statement = statement.on_conflict_do_nothing(index_elements=["name"])
    if db.session.execute(statement.returning(Chain.id)).scalar() is None:
        raise Conflict(f"a chain named {spec.name!r} exists", code="chain_exists")
    chain = get_chain(spec.name)
    db.session.refresh(chain)

    declare_chain_datasets(chain)
    return chain


def register_declared(text: str) -> list[Chain]:
    """``TRACE_CHAINS``: a JSON list of registrations, applied at start (existing ones updated)."""
    try:
        items = json.loads(text) if text.strip() else []
    except ValueError as exc:
        raise ValidationError(f"TRACE_CHAINS is not JSON: {exc}", path="TRACE_CHAINS") from None
    if not isinstance(items, list):
        raise ValidationError("TRACE_CHAINS is a JSON list of chains", path="TRACE_CHAINS")
    return [register(parse_spec(item), replace=True) for item in items]


