"""``when`` conditions: one SELECT over a job's inputs, run by the Query Service.

A condition reads the job's input datasets at their current versions (the same names its
tasks query them by), with the engine and limits of ``POST /v1/query``. It must answer one
row whose first column is a boolean: true fires, false or NULL does not. Anything else, and
any query error, is a :class:`ConditionError` (a user error: it is recorded in the trigger
ledger and logged, never retried).

The answer depends only on the SQL and the versions it reads, so it is remembered per
(job, SQL, input versions): the beat's sweep re-evaluates a false condition only once an
input has a new version.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict

from sqlalchemy import text

from tracecore.dags.catalog import Job
from tracecore.data.datasets import Dataset, views_for_condition
from tracecore.data.publish import pinned_inputs
from tracecore.db.engine import db, libpq_url
from tracecore.exceptions import TraceError, UserError
from tracecore.infra.storage import object_store
from tracecore.query import engine as query
from tracecore.settings import current_settings

_REMEMBERED = 2048
_answers: OrderedDict[tuple[uuid.UUID, str, tuple[tuple[uuid.UUID, int | None], ...]], bool | str] = OrderedDict()

_SAVED_BY = text("SELECT created_by FROM dag_versions WHERE dag_id = :dag_id AND version = :version")


class ConditionError(UserError):
    code = "condition_error"


def input_datasets(job: Job) -> list[Dataset]:
    """The datasets behind the job's inputs (platform sources have none)."""
    try:
        pins = pinned_inputs(job.org_id, job.spec)
    except TraceError:
        return []  # an input job was removed since: nothing to watch
    ids = [uuid.UUID(pin["dataset_id"]) for pin in pins if pin.get("dataset_id")]
    return [dataset for dataset in (db.session.get(Dataset, dataset_id) for dataset_id in ids) if dataset]


def holds(job: Job, sql: str) -> bool:
    """Evaluate ``sql`` for ``job`` now; raises ConditionError when it cannot answer."""
    datasets = input_datasets(job)
    key = (job.id, sql, tuple(sorted((d.id, d.current_version) for d in datasets)))
    if key not in _answers:
        _answers[key] = _evaluate(job, sql, datasets)
        while len(_answers) > _REMEMBERED:
            _answers.popitem(last=False)
    answer = _answers[key]
    if isinstance(answer, str):
        raise ConditionError(answer)
    return answer


def _evaluate(job: Job, sql: str, datasets: list[Dataset]) -> bool | str:
    settings = current_settings()
    saved_by = db.session.scalar(_SAVED_BY, {"dag_id": job.dag_id, "version": job.dag_version})
    try:
        views = views_for_condition(job.org_id, [d.id for d in datasets], saved_by)
        result = query.run_query(sql, views, store=object_store(settings), limit=2,
                                 timeout_s=settings.query_timeout, memory_limit=settings.query_memory_limit,
                                 threads=settings.query_threads,
                                 pg_conninfo=libpq_url(settings.database_url or ""))
    except TraceError as exc:
        return f"{exc.code}: {exc}"
    if len(result.rows) != 1 or not result.columns:
        return f"the condition answered {len(result.rows)} row(s); it must answer exactly one"
    value = next(iter(result.rows[0].values()))
    if value is not None and not isinstance(value, bool):
        return f"the condition answered {type(value).__name__} {value!r}; it must answer a boolean"
    return bool(value)
