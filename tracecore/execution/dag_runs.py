"""DAG runs and re-runs: one Run with one Task per job, and the dependency gate between them.

A DAG run is created in one transaction (every task queued, ``open_tasks`` = the number of
tasks), then executed as a Celery canvas (``scheduler/canvas.py``). The canvas is the fast
path; the database is the judge: before a task of a DAG run is leased, :func:`gate` checks
that every upstream task *of the same run* succeeded, so a duplicate delivery that fires a
chord early can never run a job before its inputs. A dead-lettered task cancels every task
downstream of it (:func:`cancel_downstream`), each counted as failed so the run finishes
``failed``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from tracecore.dags.catalog import Dag, Job, get_dag
from tracecore.dags.spec import DagSpec, JobSpec
from tracecore.db.engine import db, execute_one
from tracecore.exceptions import Conflict, NotFound, ValidationError
from tracecore.execution import sql
from tracecore.execution.runs import TERMINAL_TASK_STATES, Run, Task, get_run, tasks_of
from tracecore.execution.states import Gate, TaskState

RERUN_SCOPES = ("self", "downstream", "failed")
FAILED_TASK_STATES = (TaskState.DEAD_LETTER, TaskState.CANCELED)


def dag_spec(dag_id: uuid.UUID) -> tuple[DagSpec, dict[str, Job]]:
    """The DAG's live jobs as a spec (graph queries), and the job rows by name."""
    jobs = list(db.session.scalars(select(Job).where(Job.dag_id == dag_id, Job.deleted_at.is_(None))
                                   .order_by(Job.created_at, Job.name)))
    return DagSpec(jobs=tuple(JobSpec.from_dict(job.spec) for job in jobs)), {job.name: job for job in jobs}


def descendants(spec: DagSpec, roots: list[str]) -> list[str]:
    """``roots`` and every job downstream of them, in topological order."""
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(spec.downstream(name))
    return [name for name in spec.topological_order() if name in seen]


@dataclass(frozen=True)
class Series:
    """Steps one after another: each starts once the whole step before it has finished."""

    steps: tuple[Shape, ...]


@dataclass(frozen=True)
class Parallel:
    """Steps that do not depend on each other."""

    steps: tuple[Shape, ...]


Shape = str | Series | Parallel  # a job name is one step


# Past this many nested steps a part is laid out level by level: Celery's canvas code recurses too.
MAX_NESTING = 40


def shape(spec: DagSpec, names: list[str]) -> Shape:
    """How a run of the jobs ``names`` is laid out as a canvas (upstreams outside it are ignored).

    Series-parallel DAGs (chains, fan-outs, fan-ins, diamonds, independent pipelines) come out
    exact: every job waits for its own upstreams and nothing else, so a job with several
    upstreams follows a parallel step over exactly them (in Celery, the callback of a chord over
    them). A part that has no exact layout (say a -> c, b -> c, b -> d: d would wait for a) runs
    level by level; there the database gate, not the canvas, decides when each job may start.
    """
    chosen = set(names)
    order = [name for name in spec.topological_order() if name in chosen]
    return _shape(order, {name: [up for up in spec.upstream(name) if up in chosen] for name in order}, MAX_NESTING)


def _shape(nodes: list[str], upstream: dict[str, list[str]], nesting: int) -> Shape:
    if len(nodes) == 1:
        return nodes[0]
    parts = _components(nodes, upstream)
    if len(parts) > 1 and nesting > 0:
        return Parallel(tuple(_shape(part, upstream, nesting - 1) for part in parts))
    inside = set(nodes)
    depth: dict[str, int] = {}
    for name in nodes:  # topological order
        depth[name] = 1 + max((depth[up] for up in upstream[name] if up in inside), default=-1)
    by_depth: list[list[str]] = [[] for _ in range(max(depth.values()) + 1)]
    for name in nodes:
        by_depth[depth[name]].append(name)
    if len(parts) == 1 and nesting > 0:
        # A series cut after depth k: every job deeper than k descends from every last job (sink)
        # at depth <= k. A sink's edges all lead deeper than k, so that holds exactly when every
        # job at depth k + 1 reads every sink directly (the deeper ones descend from those).
        pieces: list[list[str]] = [[]]
        sinks: set[str] = set()
        for level, names_at in enumerate(by_depth[:-1]):
            pieces[-1] += names_at
            sinks = (sinks | set(names_at)).difference(*(upstream[name] for name in names_at))
            if all(sinks.issubset(upstream[name]) for name in by_depth[level + 1]):
                pieces.append([])
        pieces[-1] += by_depth[-1]
        if len(pieces) > 1:
            steps: list[Shape] = []
            for piece in pieces:  # a piece has no cut of its own: a Series here is levels
                inner = _shape(piece, upstream, nesting - 1)
                steps.extend(inner.steps if isinstance(inner, Series) else (inner,))
            return Series(tuple(steps))
    return Series(tuple(level[0] if len(level) == 1 else Parallel(tuple(level)) for level in by_depth))


def _components(nodes: list[str], upstream: dict[str, list[str]]) -> list[list[str]]:
    """The weakly connected parts of ``nodes``, each in the order given (union-find)."""
    root = {name: name for name in nodes}

    def find(name: str) -> str:
        while root[name] != name:
            root[name] = root[root[name]]
            name = root[name]
        return name

    for name in nodes:
        for up in upstream[name]:
            if up in root:
                root[find(up)] = find(name)
    parts: dict[str, list[str]] = {}
    for name in nodes:
        parts.setdefault(find(name), []).append(name)
    return list(parts.values())


def create_dag_run(*, org_id: uuid.UUID, dag: Dag, job_names: list[str], cause: str,
                   triggered_by: uuid.UUID | None, parameters: dict[str, Any] | None = None
                   ) -> tuple[uuid.UUID, dict[str, uuid.UUID], DagSpec]:
    """Insert a run of ``job_names`` (all jobs of the DAG when empty): one queued task per job.

    Answers (run id, task id by job name, the DAG's spec); the caller commits, then starts the canvas.
    """
    spec, rows = dag_spec(dag.id)
    names = [name for name in spec.topological_order() if not job_names or name in job_names]
    if not names:
        raise Conflict(f"DAG {dag.name!r} has no jobs to run", code="nothing_to_run")
    run = Run(id=uuid.uuid4(), org_id=org_id, dag_id=dag.id, cause=cause, triggered_by=triggered_by,
              job_id=rows[names[0]].id if len(names) == 1 else None, parameters=parameters or {},
              config_overrides={}, state="queued", open_tasks=len(names), failed_tasks=0)
    db.session.add(run)
    db.session.flush()
    task_ids: dict[str, uuid.UUID] = {}
    for name in names:
        task = Task(id=uuid.uuid4(), org_id=org_id, run_id=run.id, job_id=rows[name].id, partition_key="",
                    window={}, state="queued", fence=0, attempts_count=0, max_retries=spec.job(name).max_retries)
        db.session.add(task)
        task_ids[name] = task.id
    db.session.flush()
    return run.id, task_ids, spec


def rerun(*, org_id: uuid.UUID, run_id: str, scope: str, job: str | None,
          triggered_by: uuid.UUID | None) -> tuple[uuid.UUID, dict[str, uuid.UUID], DagSpec]:
    """A new run (cause ``rerun``) of part of run ``run_id``'s DAG; see the README."""
    if scope not in RERUN_SCOPES:
        raise ValidationError(f"scope must be one of {', '.join(RERUN_SCOPES)}", path="scope", code="invalid_value")
    original = get_run(org_id, run_id)
    job_names = _job_names_of(original)
    dag_id = original.dag_id
    if dag_id is None:
        job_row = db.session.get(Job, original.job_id) if original.job_id else None
        if job_row is None:
            raise NotFound("the run's job no longer exists")
        dag_id = job_row.dag_id
    dag = db.session.get(Dag, dag_id)
    if dag is None or dag.org_id != org_id:
        raise NotFound("the run's DAG no longer exists")
    spec, _ = dag_spec(dag.id)
    live = {j.name for j in spec.jobs}
    if scope == "failed":
        failed = [name for name, state in job_names if state in FAILED_TASK_STATES and name in live]
        if not failed:
            raise Conflict("the run has no failed or canceled tasks", code="nothing_failed")
        chosen = descendants(spec, failed)
    else:
        if job is None:
            names = {name for name, _ in job_names}
            if len(names) != 1:
                raise ValidationError("name the job to re-run: this run has several jobs", path="job",
                                      code="missing_field")
            job = names.pop()
        if job not in live:
            raise NotFound(f"no job named {job!r} in DAG {dag.name!r}")
        chosen = [job] if scope == "self" else descendants(spec, [job])
    parameters = {"rerun_of": str(original.id), "scope": scope, **({"job": job} if job else {})}
    return create_dag_run(org_id=org_id, dag=dag, job_names=chosen, cause="rerun", triggered_by=triggered_by,
                          parameters=parameters)


def _job_names_of(run: Run) -> list[tuple[str, str]]:
    tasks = tasks_of(run)
    names = dict(db.session.execute(select(Job.id, Job.name).where(Job.id.in_({t.job_id for t in tasks}))).all())
    return [(names[task.job_id], task.state) for task in tasks]


def start_dag(org_id: uuid.UUID, dag_name: str, *, triggered_by: uuid.UUID | None,
              parameters: dict[str, Any] | None = None) -> tuple[uuid.UUID, dict[str, uuid.UUID], DagSpec]:
    return create_dag_run(org_id=org_id, dag=get_dag(org_id, dag_name), job_names=[], cause="manual",
                          triggered_by=triggered_by, parameters=parameters)


# --- the gate, used by the canvas task on the worker ---------------------------------------------------------

def gate(task_id: str) -> Gate:
    """Whether a task of a DAG run may be leased now (see :class:`Gate`)."""
    row = execute_one(sql.UPSTREAM_STATES, {"task_id": task_id})
    if row is None or row["state"] in TERMINAL_TASK_STATES:
        return Gate.DONE
    upstream = set(JobSpec.from_dict(row["spec"]).dependencies())
    states = [state for name, state in row["others"] if name in upstream]
    if any(state in FAILED_TASK_STATES for state in states):
        return Gate.BLOCKED
    return Gate.READY if all(state == TaskState.SUCCEEDED for state in states) else Gate.WAIT


def task_state(task_id: str) -> str | None:
    db.session.rollback()
    return db.session.scalar(select(Task.state).where(Task.id == uuid.UUID(task_id)))


def queued_tasks_of_run(task_id: str) -> list[str]:
    """The still-queued tasks of ``task_id``'s run."""
    run_id = select(Task.run_id).where(Task.id == uuid.UUID(task_id)).scalar_subquery()
    ids = [str(i) for i in db.session.scalars(select(Task.id).where(Task.run_id == run_id, Task.state == "queued"))]
    db.session.rollback()
    return ids


def cancel_downstream(task_id: str, *, include_self: bool = False) -> int:
    """Cancel every open task of the run downstream of ``task_id``'s job (it failed); answers how many."""
    task = db.session.get(Task, uuid.UUID(task_id))
    if task is None:
        return 0
    run_tasks = list(db.session.execute(select(Task.id, Job.name, Job.spec).join(Job, Job.id == Task.job_id)
                                        .where(Task.run_id == task.run_id)).all())
    name_of = {row.id: row.name for row in run_tasks}
    spec = DagSpec(jobs=tuple(JobSpec.from_dict(row.spec) for row in run_tasks))
    failed = name_of[task.id]
    doomed = set(descendants(spec, [failed])) - (set() if include_self else {failed})
    ids = [str(row.id) for row in run_tasks if row.name in doomed]
    if not ids:
        db.session.rollback()
        return 0
    row = db.session.execute(sql.CANCEL_DOWNSTREAM, {"ids": ids, "run_id": task.run_id,
                                                     "why": f"canceled: upstream job {failed!r} failed"}).one()
    db.session.commit()
    return int(row.canceled or 0)
