"""The database itself enforces the run/task/attempt state machine.

Every statement here is raw SQL, as a buggy or stale writer would send it: the
triggers, CHECK constraints and partial unique indexes must refuse what
``tracecore.execution.runs`` does not allow, and accept exactly what it does.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass

import pytest
from flask import Flask
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError

from tracecore.dags import catalog as dags
from tracecore.db.engine import db
from tracecore.execution.runs import ATTEMPT_TRANSITIONS, RUN_TRANSITIONS, TASK_TRANSITIONS
from tracecore.tenancy import orgs

CHECK_VIOLATION = "23514"
UNIQUE_VIOLATION = "23505"


@dataclass
class Rows:
    org_id: uuid.UUID
    job_id: uuid.UUID


@pytest.fixture
def rows(app: Flask) -> Rows:
    org = orgs.create_org("fsm-org")
    dags.save_dag(org.id, "fsm", "- name: fsm\n  runtime: platform\n  operator: noop\n",
                  content_type="application/yaml", user_id=None)
    job = dags.get_job(org.id, "fsm")
    db.session.commit()
    return Rows(org.id, job.id)


def sql(statement: str, **params: object) -> None:
    db.session.execute(text(statement), params)


def refused(statement: str, code: str = CHECK_VIOLATION, match: str = "", **params: object) -> str:
    """Run ``statement``; it must fail with ``code``. Answers the database's message."""
    with pytest.raises(DBAPIError) as error:
        sql(statement, **params)
        db.session.flush()
    db.session.rollback()
    assert isinstance(error.value, IntegrityError), error.value
    assert getattr(error.value.orig, "sqlstate", None) == code, error.value
    message = str(error.value.orig)
    assert match in message, message
    return message


# Columns each state needs to satisfy the CHECK constraints, so that only the transition rule decides.
TASK_COLUMNS = {
    "queued": "lease_owner = NULL, lease_expires_at = NULL, next_attempt_at = NULL, finished_at = NULL",
    "running": "lease_owner = 'w', lease_expires_at = now() + interval '1 hour', next_attempt_at = NULL, "
               "finished_at = NULL",
    "retrying": "next_attempt_at = now(), finished_at = NULL",
    "succeeded": "finished_at = now()",
    "dead_letter": "finished_at = now()",
    "canceled": "finished_at = now()",
}
TASK_INSERT_COLUMNS = {
    "queued": {},
    "running": {"lease_owner": "'w'", "lease_expires_at": "now() + interval '1 hour'"},
    "retrying": {"next_attempt_at": "now()"},
    "succeeded": {"finished_at": "now()"},
    "dead_letter": {"finished_at": "now()"},
    "canceled": {"finished_at": "now()"},
}


def insert_run(rows: Rows, state: str = "queued") -> uuid.UUID:
    run_id = uuid.uuid4()
    finished = "now()" if not RUN_TRANSITIONS[state] else "NULL"
    sql(f"INSERT INTO runs (id, org_id, job_id, cause, parameters, config_overrides, state, open_tasks, "
        f"failed_tasks, finished_at) VALUES (:id, :org, :job, 'manual', '{{}}', '{{}}', :state, 1, 0, {finished})",
        id=run_id, org=rows.org_id, job=rows.job_id, state=state)
    return run_id


def insert_task(rows: Rows, state: str, fence: int = 1) -> uuid.UUID:
    run_id = insert_run(rows)
    task_id = uuid.uuid4()
    extra = TASK_INSERT_COLUMNS[state]
    columns = "".join(f", {column}" for column in extra)
    values = "".join(f", {value}" for value in extra.values())
    sql(f"INSERT INTO tasks (id, org_id, run_id, job_id, partition_key, \"window\", state, fence, attempts_count, "
        f"max_retries{columns}) VALUES (:id, :org, :run, :job, '', '{{}}', :state, :fence, 1, 3{values})",
        id=task_id, org=rows.org_id, run=run_id, job=rows.job_id, state=state, fence=fence)
    return task_id


def insert_attempt(rows: Rows, task_id: uuid.UUID, state: str, fence: int = 1) -> uuid.UUID:
    attempt_id = uuid.uuid4()
    finished = "NULL" if state == "running" else "now()"
    sql(f"INSERT INTO attempts (id, org_id, task_id, number, fence, worker, state, finished_at) "
        f"VALUES (:id, :org, :task, 1, :fence, 'w', :state, {finished})",
        id=attempt_id, org=rows.org_id, task=task_id, fence=fence, state=state)
    return attempt_id


def move_task(task_id: uuid.UUID, new_state: str, fence: str = "fence") -> None:
    sql(f"UPDATE tasks SET state = :state, fence = {fence}, {TASK_COLUMNS[new_state]} WHERE id = :id",
        state=new_state, id=task_id)
    db.session.flush()


def pairs(transitions: dict[str, tuple[str, ...]], *, allowed: bool) -> list[tuple[str, str]]:
    """Listed pairs, or every pair of distinct states that is not listed."""
    if allowed:
        return [(old, new) for old, nexts in transitions.items() for new in nexts]
    return [(old, new) for old, new in itertools.permutations(transitions, 2) if new not in transitions[old]]


# --- every listed transition is accepted, every other one refused -------------------------------------------


@pytest.mark.parametrize(("old", "new"), pairs(TASK_TRANSITIONS, allowed=True))
def test_task_transition_listed_is_accepted(rows: Rows, old: str, new: str) -> None:
    task_id = insert_task(rows, old)
    db.session.commit()
    # Leasing always bumps the fence; running -> running is only legal as a takeover.
    move_task(task_id, new, fence="fence + 1" if new == "running" else "fence")
    db.session.commit()
    assert db.session.execute(text("SELECT state FROM tasks WHERE id = :id"), {"id": task_id}).scalar_one() == new


@pytest.mark.parametrize(("old", "new"), pairs(TASK_TRANSITIONS, allowed=False))
def test_task_transition_not_listed_is_refused(rows: Rows, old: str, new: str) -> None:
    task_id = insert_task(rows, old)
    db.session.commit()
    refused(f"UPDATE tasks SET state = :state, fence = fence + 1, {TASK_COLUMNS[new]} WHERE id = :id",
            match=f"tasks: illegal state transition {old} -> {new}", state=new, id=task_id)
    assert db.session.execute(text("SELECT state FROM tasks WHERE id = :id"), {"id": task_id}).scalar_one() == old


@pytest.mark.parametrize(("old", "new"), pairs(RUN_TRANSITIONS, allowed=True))
def test_run_transition_listed_is_accepted(rows: Rows, old: str, new: str) -> None:
    run_id = insert_run(rows, old)
    db.session.commit()
    finished = "now()" if not RUN_TRANSITIONS[new] else "NULL"
    sql(f"UPDATE runs SET state = :state, finished_at = {finished} WHERE id = :id", state=new, id=run_id)
    db.session.commit()
    assert db.session.execute(text("SELECT state FROM runs WHERE id = :id"), {"id": run_id}).scalar_one() == new


@pytest.mark.parametrize(("old", "new"), pairs(RUN_TRANSITIONS, allowed=False))
def test_run_transition_not_listed_is_refused(rows: Rows, old: str, new: str) -> None:
    run_id = insert_run(rows, old)
    db.session.commit()
    finished = "now()" if not RUN_TRANSITIONS[new] else "NULL"
    refused(f"UPDATE runs SET state = :state, finished_at = {finished} WHERE id = :id",
            match=f"runs: illegal state transition {old} -> {new}", state=new, id=run_id)


@pytest.mark.parametrize(("old", "new"), pairs(ATTEMPT_TRANSITIONS, allowed=True))
def test_attempt_transition_listed_is_accepted(rows: Rows, old: str, new: str) -> None:
    attempt_id = insert_attempt(rows, insert_task(rows, "running"), old)
    db.session.commit()
    finished = "NULL" if new == "running" else "now()"
    sql(f"UPDATE attempts SET state = :state, finished_at = {finished} WHERE id = :id", state=new, id=attempt_id)
    db.session.commit()
    assert db.session.execute(text("SELECT state FROM attempts WHERE id = :id"),
                              {"id": attempt_id}).scalar_one() == new


@pytest.mark.parametrize(("old", "new"), pairs(ATTEMPT_TRANSITIONS, allowed=False))
def test_attempt_transition_not_listed_is_refused(rows: Rows, old: str, new: str) -> None:
    attempt_id = insert_attempt(rows, insert_task(rows, "running"), old)
    db.session.commit()
    finished = "NULL" if new == "running" else "now()"
    refused(f"UPDATE attempts SET state = :state, finished_at = {finished} WHERE id = :id",
            match=f"attempts: illegal state transition {old} -> {new}", state=new, id=attempt_id)


def test_the_parametrized_tables_cover_every_pair() -> None:
    for transitions in (TASK_TRANSITIONS, RUN_TRANSITIONS, ATTEMPT_TRANSITIONS):
        listed = pairs(transitions, allowed=True)
        unlisted = pairs(transitions, allowed=False)
        assert not set(listed) & set(unlisted)
        distinct = {(old, new) for old, new in listed if old != new} | set(unlisted)
        assert distinct == set(itertools.permutations(transitions, 2))
    # Terminal states have no way out.
    assert [state for state, nexts in TASK_TRANSITIONS.items() if not nexts] == ["succeeded", "dead_letter",
                                                                                 "canceled"]


# --- the named illegal writes of the issue ------------------------------------------------------------------


def test_a_succeeded_task_cannot_run_again(rows: Rows) -> None:
    task_id = insert_task(rows, "succeeded")
    db.session.commit()
    refused(f"UPDATE tasks SET state = 'running', fence = fence + 1, {TASK_COLUMNS['running']} WHERE id = :id",
            match="illegal state transition succeeded -> running", id=task_id)


def test_a_dead_letter_task_cannot_be_requeued(rows: Rows) -> None:
    task_id = insert_task(rows, "dead_letter")
    db.session.commit()
    refused(f"UPDATE tasks SET state = 'queued', {TASK_COLUMNS['queued']} WHERE id = :id",
            match="illegal state transition dead_letter -> queued", id=task_id)


def test_a_queued_task_cannot_succeed_without_running(rows: Rows) -> None:
    task_id = insert_task(rows, "queued")
    db.session.commit()
    refused("UPDATE tasks SET state = 'succeeded', finished_at = now() WHERE id = :id",
            match="illegal state transition queued -> succeeded", id=task_id)


@pytest.mark.parametrize("state", list(TASK_TRANSITIONS))
def test_the_fence_never_decreases(rows: Rows, state: str) -> None:
    task_id = insert_task(rows, state, fence=5)
    db.session.commit()
    refused("UPDATE tasks SET fence = 4 WHERE id = :id", match="tasks.fence may only grow (5 -> 4)", id=task_id)
    sql("UPDATE tasks SET fence = 5 WHERE id = :id", id=task_id)  # unchanged is fine
    db.session.commit()


def test_the_fence_is_never_negative(rows: Rows) -> None:
    run_id = insert_run(rows)
    refused("INSERT INTO tasks (id, org_id, run_id, job_id, partition_key, \"window\", state, fence, "
            "attempts_count, max_retries) VALUES (:id, :org, :run, :job, '', '{}', 'queued', -1, 0, 3)",
            match="ck_tasks_fence", id=uuid.uuid4(), org=rows.org_id, run=run_id, job=rows.job_id)


def test_running_needs_a_lease_owner_and_expiry(rows: Rows) -> None:
    task_id = insert_task(rows, "queued")
    db.session.commit()
    refused("UPDATE tasks SET state = 'running', fence = fence + 1, lease_expires_at = now() + interval '1 minute' "
            "WHERE id = :id", match="ck_tasks_running_has_lease", id=task_id)
    refused("UPDATE tasks SET state = 'running', fence = fence + 1, lease_owner = 'w' WHERE id = :id",
            match="ck_tasks_running_has_lease", id=task_id)
    running = insert_task(rows, "running")
    db.session.commit()
    refused("UPDATE tasks SET lease_expires_at = NULL WHERE id = :id", match="ck_tasks_running_has_lease",
            id=running)


def test_retrying_needs_a_next_attempt_time(rows: Rows) -> None:
    task_id = insert_task(rows, "running")
    db.session.commit()
    refused("UPDATE tasks SET state = 'retrying', next_attempt_at = NULL WHERE id = :id",
            match="ck_tasks_retry_has_time", id=task_id)


def test_terminal_states_need_a_finish_time_and_others_none(rows: Rows) -> None:
    task_id = insert_task(rows, "running")
    db.session.commit()
    refused("UPDATE tasks SET state = 'succeeded' WHERE id = :id", match="ck_tasks_finished", id=task_id)
    refused("UPDATE tasks SET finished_at = now() WHERE id = :id", match="ck_tasks_finished", id=task_id)
    run_id = insert_run(rows, "running")
    db.session.commit()
    refused("UPDATE runs SET state = 'succeeded' WHERE id = :id", match="ck_runs_finished", id=run_id)


def test_a_new_lease_owner_needs_a_new_fence(rows: Rows) -> None:
    task_id = insert_task(rows, "running", fence=3)
    db.session.commit()
    refused("UPDATE tasks SET lease_owner = 'thief' WHERE id = :id", match="a new lease owner needs a new fence",
            id=task_id)
    # A renewal (same owner, same fence, later expiry) is fine; so is a takeover with the next fence.
    sql("UPDATE tasks SET lease_expires_at = now() + interval '2 hours' WHERE id = :id", id=task_id)
    sql("UPDATE tasks SET lease_owner = 'heir', fence = 4 WHERE id = :id", id=task_id)
    db.session.commit()
    assert db.session.execute(text("SELECT lease_owner, fence FROM tasks WHERE id = :id"),
                              {"id": task_id}).one() == ("heir", 4)


def test_two_running_attempts_for_one_task_are_refused(rows: Rows) -> None:
    task_id = insert_task(rows, "running", fence=2)
    insert_attempt(rows, task_id, "running", fence=1)
    db.session.commit()
    refused("INSERT INTO attempts (id, org_id, task_id, number, fence, worker, state) "
            "VALUES (:id, :org, :task, 2, 2, 'w2', 'running')", code=UNIQUE_VIOLATION,
            match="uq_attempts_one_running", id=uuid.uuid4(), org=rows.org_id, task=task_id)
    # Once the first is lost, the second may run.
    sql("UPDATE attempts SET state = 'lost', finished_at = now() WHERE task_id = :task", task=task_id)
    insert_attempt(rows, task_id, "running", fence=2)
    db.session.commit()


def test_one_attempt_per_fence(rows: Rows) -> None:
    task_id = insert_task(rows, "running")
    insert_attempt(rows, task_id, "failed", fence=1)
    db.session.commit()
    refused("INSERT INTO attempts (id, org_id, task_id, number, fence, worker, state) "
            "VALUES (:id, :org, :task, 2, 1, 'w2', 'running')", code=UNIQUE_VIOLATION,
            match="uq_attempts_task_fence", id=uuid.uuid4(), org=rows.org_id, task=task_id)


def test_a_succeeded_attempt_cannot_run_again(rows: Rows) -> None:
    attempt_id = insert_attempt(rows, insert_task(rows, "running"), "succeeded")
    db.session.commit()
    refused("UPDATE attempts SET state = 'running', finished_at = NULL WHERE id = :id",
            match="attempts: illegal state transition succeeded -> running", id=attempt_id)


def test_a_running_attempt_needs_no_finish_time_and_a_finished_one_does(rows: Rows) -> None:
    attempt_id = insert_attempt(rows, insert_task(rows, "running"), "running")
    db.session.commit()
    refused("UPDATE attempts SET state = 'succeeded' WHERE id = :id", match="ck_attempts_finished", id=attempt_id)
    refused("UPDATE attempts SET finished_at = now() WHERE id = :id", match="ck_attempts_finished", id=attempt_id)


def test_a_succeeded_run_cannot_run_again(rows: Rows) -> None:
    run_id = insert_run(rows, "succeeded")
    db.session.commit()
    refused("UPDATE runs SET state = 'running', finished_at = NULL WHERE id = :id",
            match="runs: illegal state transition succeeded -> running", id=run_id)


@pytest.mark.parametrize(("table", "bad"), [("runs", "paused"), ("tasks", "paused"), ("attempts", "paused")])
def test_unknown_states_are_refused(rows: Rows, table: str, bad: str) -> None:
    task_id = insert_task(rows, "running")
    attempt_id = insert_attempt(rows, task_id, "running")
    db.session.commit()
    row_id = {"runs": db.session.execute(text("SELECT run_id FROM tasks WHERE id = :id"), {"id": task_id})
              .scalar_one(), "tasks": task_id, "attempts": attempt_id}[table]
    refused(f"UPDATE {table} SET state = :state WHERE id = :id", state=bad, id=row_id)
