"""Data-driven triggers (``activation: reactive``, ``execution_strategy: PerUpdate``).

A committed dataset version sends ``trace.dataset_updated(dataset_id, version)``; this module
turns it into one run (cause ``data``) of every live reactive job of the org that reads the
dataset's producer output, with that update's window in the task. The fire-once guard is a row
of ``trigger_firings`` keyed ``(job_id, "data:<dataset_id>:<version>")`` (UNIQUE), inserted with
``ON CONFLICT DO NOTHING`` in the run's transaction: a duplicate delivery makes no second run.

Not yet: ``Batched`` coalescing, ``idle_timeout``, ``trigger: {when: ...}`` conditions.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select, text

from tracecore import runs
from tracecore.dags import Job
from tracecore.dataset_schema import parse_partition_key
from tracecore.datasets import Dataset, DatasetVersion
from tracecore.db import db
from tracecore.exceptions import NotFound, ValidationError

_CLAIM = text("INSERT INTO trigger_firings (id, org_id, job_id, key) VALUES (:id, :org_id, :job_id, :key) "
              "ON CONFLICT (job_id, key) DO NOTHING RETURNING id")


def fire_once(org_id: uuid.UUID, job: Job, key: str, *, cause: str,
              window: dict[str, Any] | None = None, parameters: dict[str, Any] | None = None) -> uuid.UUID | None:
    """Claim ``(job, key)`` and create the run in the caller's transaction; answers the task id,
    or None when the key was already fired (the caller commits, then enqueues)."""
    firing_id = db.session.execute(_CLAIM, {"id": uuid.uuid4(), "org_id": org_id, "job_id": job.id,
                                            "key": key}).scalar()
    if firing_id is None:
        return None
    run_id, task_id = runs.create_run(org_id=org_id, job_name=job.name, cause=cause, triggered_by=None,
                                      parameters=parameters, window=window)
    db.session.execute(text("UPDATE trigger_firings SET run_id = :run_id WHERE id = :id"),
                       {"run_id": run_id, "id": firing_id})
    return task_id


def update_window(dataset: Dataset, version: DatasetVersion) -> dict[str, Any]:
    window: dict[str, Any] = {"dataset": dataset.name, "version": version.version,
                              "partition_key": version.partition_key}
    if version.partition_key:
        try:
            kind, start, end = parse_partition_key(version.partition_key)
        except ValidationError:
            return window
        if kind == "block_range":
            window["block_start"], window["block_end"] = int(start), int(end)
    return window


def reactive_jobs(dataset: Dataset) -> list[Job]:
    """Live reactive jobs of the dataset's org that read its producer's output."""
    if dataset.producer_job_id is None:
        return []
    producer = db.session.get(Job, dataset.producer_job_id)
    if producer is None or producer.deleted_at is not None:
        return []
    outputs = [item.get("dataset") for item in producer.spec.get("output_datasets", [])]
    index = outputs.index(dataset.name) if dataset.name in outputs else None
    jobs = db.session.scalars(select(Job).where(Job.org_id == dataset.org_id, Job.deleted_at.is_(None),
                                                Job.spec["activation"].astext == "reactive"))
    return [job for job in jobs
            if any(ref.get("job") == producer.name and (index is None or ref.get("output") == index)
                   for ref in job.spec.get("inputs", []))]


def on_dataset_updated(dataset_id: uuid.UUID | str, version: int) -> list[uuid.UUID]:
    """One run per reactive downstream job for this update (PerUpdate), committed; answers the
    task ids to enqueue (empty for a duplicate delivery)."""
    try:
        dataset = db.session.get(Dataset, uuid.UUID(str(dataset_id)))
        if dataset is None:
            return []
        found = db.session.scalars(select(DatasetVersion).where(DatasetVersion.dataset_id == dataset.id,
                                                                DatasetVersion.version == version)).first()
        if found is None:
            return []
        window = update_window(dataset, found)
        task_ids = []
        for job in reactive_jobs(dataset):
            if job.spec.get("execution_strategy") not in (None, "PerUpdate"):
                continue  # Batched is not implemented yet
            try:
                task_id = fire_once(dataset.org_id, job, f"data:{dataset.id}:{version}", cause="data",
                                    window=window)
            except NotFound:
                continue
            if task_id is not None:
                task_ids.append(task_id)
        db.session.commit()
        return task_ids
    except BaseException:
        db.session.rollback()
        raise
