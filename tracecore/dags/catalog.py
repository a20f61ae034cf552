"""DAGs, their versions, and the jobs they define.

A save never edits a version: it adds one, and the DAG's jobs table is brought in
line with the newest version (a job dropped from the DAG is marked deleted, so its
run history still resolves). Job names are unique per org, because inputs, triggers
and ``/v1/jobs/{name}`` name jobs across DAGs.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from tracecore.dags.bounds import bounds
from tracecore.dags.spec import DagSpec, default_output_datasets, parse_dag
from tracecore.data import datasets
from tracecore.data.datasets import find_visible
from tracecore.db.engine import Base, created_at, db, uuid_pk
from tracecore.exceptions import Conflict, NotFound, ValidationError
from tracecore.execution import bundles, operators
from tracecore.settings import current_settings

NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"


class Dag(Base):
    __tablename__ = "dags"
    __table_args__ = (UniqueConstraint("org_id", "name"),)
    id: Mapped[uuid.UUID] = uuid_pk()
    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    current_version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    created_at: Mapped[datetime] = created_at()
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class DagVersion(Base):
    __tablename__ = "dag_versions"
    __table_args__ = (UniqueConstraint("dag_id", "version"),)
    id: Mapped[uuid.UUID] = uuid_pk()
    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False)
    dag_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("dags.id", ondelete="CASCADE"), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    source: Mapped[str] = mapped_column(Text, nullable=False)
    created_by: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("users.id"))
    created_at: Mapped[datetime] = created_at()


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        # A live job name is unique in its org; deleted jobs keep their rows for history.
        Index("uq_jobs_org_name_live", "org_id", "name", unique=True, postgresql_where=text("deleted_at IS NULL")),
    )
    id: Mapped[uuid.UUID] = uuid_pk()
    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False)
    dag_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("dags.id", ondelete="CASCADE"), nullable=False)
    dag_version: Mapped[int] = mapped_column(Integer, nullable=False)
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    operator: Mapped[str] = mapped_column(String(64), nullable=False)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    created_at: Mapped[datetime] = created_at()
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Schedule(Base):
    """A job's ``schedule:``, derived on every save of its DAG (:func:`sync_schedules`); the beat fires it
    (``triggers.fire_due``). Only ``paused`` is set through the API."""

    __tablename__ = "schedules"
    id: Mapped[uuid.UUID] = uuid_pk()
    org_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False)
    job_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False,
                                              unique=True)
    cron: Mapped[str | None] = mapped_column(String(128))
    every_s: Mapped[float | None] = mapped_column(Float)
    timezone: Mapped[str] = mapped_column(String(64), nullable=False, default="UTC")
    catch_up: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    paused: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[datetime] = created_at()


def _check_name(name: str) -> None:
    if not re.match(NAME_PATTERN, name):
        raise ValidationError(f"DAG name {name!r} must match {NAME_PATTERN}", path="name", code="invalid_value")


def save_dag(org_id: uuid.UUID, name: str, body: Any, *, content_type: str | None,
             user_id: uuid.UUID | None) -> tuple[Dag, DagVersion]:
    """Validate ``body`` and store it as the DAG's next version."""
    _check_name(name)
    dag = db.session.scalar(select(Dag).where(Dag.org_id == org_id, Dag.name == name).with_for_update())
    other_jobs = _outputs_of_other_dags(org_id, dag.id if dag else None)

    def external_outputs(job_name: str) -> int | None:
        if job_name in other_jobs:
            return other_jobs[job_name]
        return operators.PLATFORM_SOURCES.get(job_name)

    def dataset_exists(name: str) -> bool:
        try:
            find_visible(org_id, name)
        except NotFound:
            return False
        return True

    spec = parse_dag(body, content_type=content_type, external_outputs=external_outputs,
                     operators=operators.CATALOG, limits=bounds(current_settings()), dataset_exists=dataset_exists)
    _check_bundles(org_id, spec)
    for index, job in enumerate(spec.jobs):
        if job.name in other_jobs:
            raise Conflict(f"job {job.name!r} belongs to another DAG of this org", code="job_name_taken",
                           details={"path": f"jobs[{index}].name"})
    source = body if isinstance(body, str) else body.decode() if isinstance(body, bytes) else json.dumps(body)
    if dag is None:
        dag = Dag(org_id=org_id, name=name, current_version=1)
        db.session.add(dag)
        db.session.flush()
    else:
        dag.current_version += 1
        dag.updated_at = func.now()
    version = DagVersion(org_id=org_id, dag_id=dag.id, version=dag.current_version,
                         spec={"jobs": [job.to_dict() for job in spec.jobs]}, source=source, created_by=user_id)
    db.session.add(version)
    _sync_jobs(dag, spec)
    db.session.flush()
    sync_schedules(dag.id)
    _declare_outputs(dag, spec)
    return dag, version


def _check_bundles(org_id: uuid.UUID, spec: DagSpec) -> None:
    """Every ``udf.bundle_id`` must name a bundle of this org: a typo, or another org's id,
    fails at save time instead of at the first run."""
    refs = [(index, job.udf.bundle_id) for index, job in enumerate(spec.jobs) if job.udf is not None]
    unknown = bundles.missing_bundles(org_id, [bundle_id for _, bundle_id in refs]) if refs else set()
    errors = [{"code": "unknown_bundle", "path": f"jobs[{index}].udf.bundle_id",
               "message": f"no bundle {bundle_id!r} in this org (upload it with POST /v1/bundles)"}
              for index, bundle_id in refs if bundle_id in unknown]
    if errors:
        raise ValidationError(errors[0]["message"], path=errors[0]["path"], code="unknown_bundle",
                              details={"errors": errors})


def _outputs_of_other_dags(org_id: uuid.UUID, dag_id: uuid.UUID | None) -> dict[str, int]:
    query = select(Job.name, Job.spec["outputs"].as_integer()).where(Job.org_id == org_id, Job.deleted_at.is_(None))
    if dag_id is not None:
        query = query.where(Job.dag_id != dag_id)
    return {row[0]: row[1] or 0 for row in db.session.execute(query)}


def _sync_jobs(dag: Dag, spec: DagSpec) -> None:
    existing = {job.name: job for job in db.session.scalars(
        select(Job).where(Job.dag_id == dag.id, Job.deleted_at.is_(None)))}
    for job_spec in spec.jobs:
        job = existing.pop(job_spec.name, None)
        if job is None:
            db.session.add(Job(org_id=dag.org_id, dag_id=dag.id, dag_version=dag.current_version,
                               name=job_spec.name, operator=job_spec.operator, spec=job_spec.to_dict()))
        else:
            job.dag_version = dag.current_version
            job.operator = job_spec.operator
            job.spec = job_spec.to_dict()
            job.updated_at = func.now()
    for removed in existing.values():
        removed.deleted_at = func.now()


def sync_schedules(dag_id: uuid.UUID) -> None:
    """Make the schedule rows of a DAG's live jobs match their ``schedule:`` (pause state kept)."""
    jobs = list(db.session.scalars(select(Job).where(Job.dag_id == dag_id)))
    existing = {row.job_id: row for row in db.session.scalars(
        select(Schedule).where(Schedule.job_id.in_([job.id for job in jobs])))} if jobs else {}
    for job in jobs:
        spec = (job.spec or {}).get("schedule") if job.deleted_at is None else None
        row = existing.get(job.id)
        if not spec:
            if row is not None:
                db.session.delete(row)
            continue
        if row is None:
            row = Schedule(org_id=job.org_id, job_id=job.id, paused=False)
            db.session.add(row)
        row.cron, row.every_s = spec.get("cron"), spec.get("every_s")
        row.timezone, row.catch_up = spec.get("timezone") or "UTC", int(spec.get("catch_up") or 0)


def _declare_outputs(dag: Dag, spec: DagSpec) -> None:
    """Declare every job's output datasets (``JobSpec.output_datasets``) in the save's transaction,
    so a DAG and the datasets it promises commit or fail together.

    A dataset has one producer, the live job that declares it: a dataset declared by a live
    job of another DAG (or another job of this one) is 409 ``dataset_name_taken``; a dataset
    this DAG's jobs no longer declare loses its producer (and keeps its versions), so another
    job may take it over. Errors carry the DAG's paths
    (``jobs[0].outputs[1].schema[2].type``; ``jobs[0].outputs`` for the int form).
    """
    live = {job.name: job.id for job in db.session.scalars(
        select(Job).where(Job.dag_id == dag.id, Job.deleted_at.is_(None)))}
    names = [declared["dataset"] for job in spec.jobs for declared in job.output_datasets]
    producers = dict(db.session.execute(
        select(datasets.Dataset.name, Job.id).join(Job, Job.id == datasets.Dataset.producer_job_id)
        .where(datasets.Dataset.org_id == dag.org_id, datasets.Dataset.name.in_(names),
               Job.deleted_at.is_(None))).all()) if names else {}
    for index, job in enumerate(spec.jobs):
        listed = job.output_datasets != default_output_datasets(job.name, job.outputs)
        for k, declared in enumerate(job.output_datasets):
            path = f"jobs[{index}].outputs" + (f"[{k}]" if listed else "")
            producer = producers.get(declared["dataset"])
            if producer is not None and producer != live[job.name]:
                raise Conflict(f"dataset {declared['dataset']!r} is produced by another job of this org",
                               code="dataset_name_taken", details={"path": path})
            try:
                datasets.declare_dataset(dag.org_id, declared["dataset"], declared["kind"], declared["schema"],
                                         job.unique_key, declared["pii"], live[job.name],
                                         description=declared["description"])
            except ValidationError as exc:
                if exc.path.startswith("unique_key"):
                    at = f"jobs[{index}].{exc.path}"
                else:
                    at = f"{path}.{exc.path}" if exc.path and listed else path
                raise ValidationError(exc.message, path=at, code=exc.code,
                                      details={**{k: v for k, v in exc.details.items() if k != "path"},
                                               "errors": [{"code": exc.code, "path": at, "message": exc.message}]}
                                      ) from None
    orphaned = update(datasets.Dataset).where(datasets.Dataset.org_id == dag.org_id,
                                              datasets.Dataset.producer_job_id.in_(list(live.values())))
    if names:
        orphaned = orphaned.where(datasets.Dataset.name.not_in(names))
    db.session.execute(orphaned.values(producer_job_id=None))


def get_dag(org_id: uuid.UUID, name: str) -> Dag:
    dag = db.session.scalar(select(Dag).where(Dag.org_id == org_id, Dag.name == name))
    if dag is None:
        raise NotFound(f"no DAG named {name!r}")
    return dag


def list_dags(org_id: uuid.UUID) -> list[Dag]:
    return list(db.session.scalars(select(Dag).where(Dag.org_id == org_id).order_by(Dag.name)))


def versions_of(dag: Dag) -> list[DagVersion]:
    return list(db.session.scalars(select(DagVersion).where(DagVersion.dag_id == dag.id)
                                   .order_by(DagVersion.version.desc())))


def jobs_of(dag: Dag) -> list[Job]:
    return list(db.session.scalars(select(Job).where(Job.dag_id == dag.id, Job.deleted_at.is_(None))
                                   .order_by(Job.name)))


def get_job(org_id: uuid.UUID, name: str) -> Job:
    job = db.session.scalar(select(Job).where(Job.org_id == org_id, Job.name == name, Job.deleted_at.is_(None)))
    if job is None:
        raise NotFound(f"no job named {name!r}")
    return job
