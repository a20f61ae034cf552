"""Lineage: which attempt of which job made which dataset version from which inputs.

One edge per (output version, input): ``input`` is a dataset version, a platform source
(``block_follower``, which has no dataset) or nothing at all (a job without inputs still
gets one edge, so every version's producer is known). Edges are facts recorded by the
publish that made the version, in its transaction; recording them twice (a retried publish)
adds nothing, thanks to a unique index over the edge's identity.

Edges belong to the org whose job ran (``org_id``); a graph shows only the asking org's
edges, so a dataset granted to another org never reveals that org's jobs to its owner.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, Integer, String, Uuid, or_, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Mapped, mapped_column

from tracecore.dags.catalog import Job
from tracecore.data.datasets import GRANT_SEPARATOR, Dataset, find_visible
from tracecore.db.engine import Base, created_at, db, uuid_pk
from tracecore.exceptions import NotFound, ValidationError
from tracecore.execution import operators
from tracecore.tenancy.orgs import Org

# A graph larger than this is cut (and says so): the answer stays bounded whatever the history.
MAX_EDGES = 10_000
_NIL = "00000000-0000-0000-0000-000000000000"


class LineageEdge(Base):
    __tablename__ = "lineage_edges"
    __table_args__ = (
        Index("ix_lineage_edges_input", "input_dataset_id"),
        Index("ix_lineage_edges_output", "output_dataset_id", "output_version"),
        Index("ix_lineage_edges_org", "org_id"),
        # The edge's identity; NULL inputs are folded so that a retried publish cannot double a root edge.
        Index("uq_lineage_edges_identity", "output_dataset_id", "output_version",
              text(f"coalesce(input_dataset_id, '{_NIL}'::uuid)"), text("coalesce(input_version, 0)"),
              text("coalesce(input_source, '')"), unique=True),
    )
    id: Mapped[uuid.UUID] = uuid_pk()
    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False)
    attempt_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("attempts.id", ondelete="SET NULL"))
    run_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("runs.id", ondelete="SET NULL"))
    job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("jobs.id", ondelete="SET NULL"))
    input_dataset_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("datasets.id", ondelete="CASCADE"))
    input_version: Mapped[int | None] = mapped_column(Integer)
    input_source: Mapped[str | None] = mapped_column(String(128))  # a platform source, when not a dataset
    output_dataset_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("datasets.id", ondelete="CASCADE"),
                                                         nullable=False)
    output_version: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[datetime] = created_at()


def _resolve_input(org_id: uuid.UUID, item: Mapping[str, Any]) -> tuple[uuid.UUID | None, int | None, str | None]:
    """(dataset id, version, platform source) of one input as a capability token lists it."""
    version = item.get("version")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
        raise ValidationError(f"an input version is an integer, got {version!r}", path="inputs", code="invalid_value")
    if item.get("dataset_id"):
        return uuid.UUID(str(item["dataset_id"])), version, None
    if item.get("source"):
        return None, None, str(item["source"])
    name = str(item.get("dataset", ""))
    try:
        return find_visible(org_id, name).id, version, None
    except NotFound:
        if name in operators.PLATFORM_SOURCES:
            return None, None, name
        raise


def record_lineage(org_id: uuid.UUID, output_dataset_id: uuid.UUID, output_version: int,
                   inputs: Iterable[Mapping[str, Any]] = (), *, attempt_id: uuid.UUID | None = None,
                   run_id: uuid.UUID | None = None, job_id: uuid.UUID | None = None) -> int:
    """Record that ``output_version`` of a dataset was made from ``inputs``; answers how many
    edges are new (0 when a retry records the same facts again). Flushes, never commits.

    ``inputs`` are the capability's pinned inputs as they are: ``{"dataset": name, "version"}``
    (a name of the org, or a granted ``<owner org>__<name>``), ``{"dataset_id", "version"}``,
    or ``{"source": name}`` for a platform source; a name that is no dataset but a platform
    source (``block_follower``) is recorded as that source. An unknown name is NotFound.
    """
    resolved = {_resolve_input(org_id, item) for item in inputs} or {(None, None, None)}
    rows = [{"id": uuid.uuid4(), "org_id": org_id, "attempt_id": attempt_id, "run_id": run_id, "job_id": job_id,
             "input_dataset_id": dataset_id, "input_version": version, "input_source": source,
             "output_dataset_id": output_dataset_id, "output_version": output_version}
            for dataset_id, version, source in sorted(resolved, key=str)]
    inserted = db.session.scalars(insert(LineageEdge).values(rows).on_conflict_do_nothing()
                                  .returning(LineageEdge.id)).all()
    db.session.flush()
    return len(inserted)


def _dataset_names(org_id: uuid.UUID, ids: set[uuid.UUID]) -> dict[uuid.UUID, Dataset]:
    return {dataset.id: dataset for dataset in db.session.scalars(select(Dataset).where(Dataset.id.in_(ids)))} \
        if ids else {}


def _display(org_id: uuid.UUID, datasets: Mapping[uuid.UUID, Dataset]) -> dict[uuid.UUID, str]:
    """The name the org uses for each dataset: its own name, or ``<owner org>__<name>``."""
    owners = {dataset.org_id for dataset in datasets.values() if dataset.org_id != org_id}
    org_names = dict(db.session.execute(select(Org.id, Org.name).where(Org.id.in_(owners))).all()) \
        if owners else {}
    return {dataset_id: dataset.name if dataset.org_id == org_id
            else f"{org_names.get(dataset.org_id, '?')}{GRANT_SEPARATOR}{dataset.name}"
            for dataset_id, dataset in datasets.items()}


def _walk(org_id: uuid.UUID, start: uuid.UUID) -> tuple[list[LineageEdge], bool]:
    """Every edge upstream and downstream of ``start``, transitively (breadth first, set-wise)."""
    edges: dict[uuid.UUID, LineageEdge] = {}
    for upstream in (True, False):
        seen, frontier = {start}, {start}
        while frontier and len(edges) < MAX_EDGES:
            column = LineageEdge.output_dataset_id if upstream else LineageEdge.input_dataset_id
            found = db.session.scalars(select(LineageEdge).where(LineageEdge.org_id == org_id, column.in_(frontier))
                                       .limit(MAX_EDGES)).all()
            edges.update((edge.id, edge) for edge in found)
            reached = {edge.input_dataset_id if upstream else edge.output_dataset_id for edge in found}
            frontier = {dataset_id for dataset_id in reached if dataset_id is not None} - seen
            seen |= frontier
    return list(edges.values())[:MAX_EDGES], len(edges) >= MAX_EDGES


def lineage_graph(org_id: uuid.UUID, asset: str | None = None) -> dict[str, Any]:
    """The lineage graph as JSON: ``{"asset", "nodes", "edges", "truncated"}``.

    With ``asset`` (a dataset name the org can read): everything upstream and downstream of
    it, transitively; without: the org's whole graph. Nodes are datasets
    (``{"id": "dataset:<uuid>", "type": "dataset", "name", "kind", "current_version"}``),
    jobs (``{"id": "job:<uuid>", "type": "job", "name", "deleted"}``) and platform sources
    (``{"id": "source:<name>", "type": "source", "name"}``). Edges go the way data flows:
    input -> job -> output dataset (input -> output when the job is unknown), each
    ``{"from", "to", "versions"}`` where ``versions`` are the output versions it took part in.
    """
    root = find_visible(org_id, asset) if asset else None
    if root is not None:
        edges, truncated = _walk(org_id, root.id)
    else:
        edges = list(db.session.scalars(select(LineageEdge).where(LineageEdge.org_id == org_id)
                                        .order_by(LineageEdge.created_at).limit(MAX_EDGES + 1)))
        truncated = len(edges) > MAX_EDGES
        edges = edges[:MAX_EDGES]
    dataset_ids = {edge.output_dataset_id for edge in edges} | {edge.input_dataset_id for edge in edges
                                                                if edge.input_dataset_id is not None}
    if root is not None:
        dataset_ids.add(root.id)
    datasets = _dataset_names(org_id, dataset_ids)
    names = _display(org_id, datasets)
    job_ids = {edge.job_id for edge in edges if edge.job_id is not None}
    jobs = {job.id: job for job in db.session.scalars(select(Job).where(Job.id.in_(job_ids)))} if job_ids else {}
    nodes: dict[str, dict[str, Any]] = {}
    for dataset_id, dataset in datasets.items():
        nodes[f"dataset:{dataset_id}"] = {"id": f"dataset:{dataset_id}", "type": "dataset", "name": names[dataset_id],
                                          "kind": dataset.kind, "current_version": dataset.current_version}
    for job_id, job in jobs.items():
        nodes[f"job:{job_id}"] = {"id": f"job:{job_id}", "type": "job", "name": job.name,
                                  "deleted": job.deleted_at is not None}
    links: dict[tuple[str, str], set[int]] = {}
    for edge in edges:
        output = f"dataset:{edge.output_dataset_id}"
        source = None
        if edge.input_dataset_id is not None:
            source = f"dataset:{edge.input_dataset_id}"
        elif edge.input_source is not None:
            source = f"source:{edge.input_source}"
            nodes[source] = {"id": source, "type": "source", "name": edge.input_source}
        if edge.job_id is not None and f"job:{edge.job_id}" in nodes:
            job_node = f"job:{edge.job_id}"
            if source is not None:
                links.setdefault((source, job_node), set()).add(edge.output_version)
            links.setdefault((job_node, output), set()).add(edge.output_version)
        elif source is not None:
            links.setdefault((source, output), set()).add(edge.output_version)
    return {"asset": f"dataset:{root.id}" if root is not None else None,
            "nodes": sorted(nodes.values(), key=lambda node: (node["type"], node["name"], node["id"])),
            "edges": [{"from": a, "to": b, "versions": sorted(versions)}
                      for (a, b), versions in sorted(links.items())],
            "truncated": truncated}


def neighbors(org_id: uuid.UUID, dataset: Dataset) -> dict[str, list[dict[str, Any]]]:
    """Direct lineage of one dataset, deduplicated over versions: ``{"upstream": [{dataset,
    source, job}], "downstream": [{dataset, job}]}`` (names as the org uses them)."""
    edges = db.session.scalars(select(LineageEdge).where(
        LineageEdge.org_id == org_id,
        or_(LineageEdge.output_dataset_id == dataset.id, LineageEdge.input_dataset_id == dataset.id))).all()
    ids = {edge.input_dataset_id for edge in edges if edge.input_dataset_id} | {e.output_dataset_id for e in edges}
    names = _display(org_id, _dataset_names(org_id, ids))
    job_ids = {edge.job_id for edge in edges if edge.job_id is not None}
    jobs = dict(db.session.execute(select(Job.id, Job.name).where(Job.id.in_(job_ids))).all()) \
        if job_ids else {}
    upstream, downstream = set(), set()
    for edge in edges:
        job = jobs.get(edge.job_id) if edge.job_id else None
        if edge.output_dataset_id == dataset.id and (edge.input_dataset_id or edge.input_source):
            upstream.add((names.get(edge.input_dataset_id) if edge.input_dataset_id else None, edge.input_source, job))
        if edge.input_dataset_id == dataset.id:
            downstream.add((names[edge.output_dataset_id], job))
    return {"upstream": [{"dataset": d, "source": s, "job": j} for d, s, j in sorted(upstream, key=str)],
            "downstream": [{"dataset": d, "job": j} for d, j in sorted(downstream, key=str)]}


def inputs_by_version(dataset: Dataset) -> dict[int, list[dict[str, Any]]]:
    """For each version of ``dataset``: the inputs it was made from, and by which job."""
    edges = db.session.scalars(select(LineageEdge).where(LineageEdge.output_dataset_id == dataset.id)).all()
    names = _display(dataset.org_id, _dataset_names(dataset.org_id, {e.input_dataset_id for e in edges
                                                                     if e.input_dataset_id is not None}))
    out: dict[int, list[dict[str, Any]]] = {}
    for edge in sorted(edges, key=lambda e: (e.output_version, str(e.input_dataset_id), e.input_source or "")):
        if edge.input_dataset_id is None and edge.input_source is None:
            out.setdefault(edge.output_version, [])
            continue
        out.setdefault(edge.output_version, []).append(
            {"dataset": names.get(edge.input_dataset_id) if edge.input_dataset_id else None,
             "version": edge.input_version, "source": edge.input_source})
    return out
