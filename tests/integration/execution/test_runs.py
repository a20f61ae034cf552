"""tracecore.execution.runs.create_enqueued_run over the real PostgreSQL: the task is enqueued before its
insert commits, and a worker that gets there first waits for the commit (tracecore.execution.lease.take).

The "enqueue" of these tests is a function that starts a real lease take in another thread, as a
worker receiving the message would, and returns only once that take is seen waiting on the
creation lock in pg_locks: the interleaving is forced, not hoped for.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from flask import Flask
from sqlalchemy import text

from tests.conftest import wait_for
from tracecore.dags import catalog as dags
from tracecore.db.engine import db
from tracecore.exceptions import NotFound
from tracecore.execution import lease, runs
from tracecore.tenancy import orgs

JOB_YAML = "- name: hello\n  runtime: platform\n  operator: noop\n"
UNLIMITED = runs.RateLimit(limit=1_000_000, window=60)


@pytest.fixture
def org_id(app: Flask) -> uuid.UUID:
    org = orgs.create_org(f"runs-{uuid.uuid4().hex[:8]}")
    dags.save_dag(org.id, "d", JOB_YAML, content_type="application/yaml", user_id=None)
    db.session.commit()
    return org.id


def waiting_on_advisory_locks() -> int:
    db.session.rollback()
    return int(db.session.scalar(text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"))
               or 0)


@dataclass
class EarlyWorker:
    """An enqueue that behaves like a worker beating the commit: it takes the lease at once, in
    another thread, and hands control back only while that take waits for the creator."""

    app: Flask
    results: list[object] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def __call__(self, task_id: uuid.UUID) -> None:
        def take() -> None:
            with self.app.app_context():
                self.results.append(lease.take(task_id, "early-worker", 60))

        thread = threading.Thread(target=take)
        thread.start()
        self.threads.append(thread)
        wait_for(lambda: waiting_on_advisory_locks() == 1 or self.results, timeout=10,
                 message="the early take to wait on the creation lock")
        assert not self.results, f"the take did not wait for the creator: {self.results}"

    def join(self) -> list[object]:
        for thread in self.threads:
            thread.join(timeout=30)
        return self.results


@pytest.fixture
def early_worker(app: Flask) -> Iterator[EarlyWorker]:
    worker = EarlyWorker(app)
    yield worker
    worker.join()


def test_a_take_ahead_of_the_commit_waits_for_it_and_gets_the_task(org_id: uuid.UUID,
                                                                   early_worker: EarlyWorker) -> None:
    run_id, task_id = runs.create_enqueued_run(org_id=org_id, job_name="hello", cause="manual", triggered_by=None,
                                               rate=UNLIMITED, enqueue=early_worker, parameters={"n": 1})
    [held] = early_worker.join()
    assert isinstance(held, lease.Lease), held
    assert (held.task_id, held.run_id, held.fence, held.parameters) == (task_id, run_id, 1, {"n": 1})
    assert lease.succeed(held).run_state == "succeeded"


def test_a_creator_that_rolls_back_leaves_the_early_take_nothing(org_id: uuid.UUID,
                                                                 early_worker: EarlyWorker) -> None:
    def enqueue_then_fail(task_id: uuid.UUID) -> None:
        early_worker(task_id)
        raise ConnectionError("the broker went away after the message was sent")

    with pytest.raises(ConnectionError):
        runs.create_enqueued_run(org_id=org_id, job_name="hello", cause="manual", triggered_by=None,
                                 rate=UNLIMITED, enqueue=enqueue_then_fail)
    assert early_worker.join() == [lease.Refused.HELD]  # the message is dropped, nothing was leased
    db.session.rollback()
    assert db.session.scalar(text("SELECT count(*) FROM runs WHERE org_id = :o"), {"o": org_id}) == 0


def test_refused_triggers_enqueue_nothing_and_still_count(org_id: uuid.UUID) -> None:
    sent: list[uuid.UUID] = []
    with pytest.raises(NotFound):
        runs.create_enqueued_run(org_id=org_id, job_name="nope", cause="manual", triggered_by=None,
                                 rate=runs.RateLimit(limit=1, window=60), enqueue=sent.append)
    with pytest.raises(runs.RateLimited):  # the missing job's trigger was the window's one run
        runs.create_enqueued_run(org_id=org_id, job_name="hello", cause="manual", triggered_by=None,
                                 rate=runs.RateLimit(limit=1, window=60), enqueue=sent.append)
    assert sent == []
    db.session.rollback()
    assert db.session.scalar(text("SELECT runs FROM org_run_rate WHERE org_id = :o"), {"o": org_id}) == 2
    assert db.session.scalar(text("SELECT count(*) FROM runs WHERE org_id = :o"), {"o": org_id}) == 0


def test_a_take_gives_up_on_a_creator_that_never_ends(org_id: uuid.UUID, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A creator stalled mid-transaction: past the wait limit the take answers None (the
    message is dropped; the reaper's sweep sends a task that later commits again)."""
    monkeypatch.setattr(lease.sql, "WAIT_FOR_CREATOR", text("SELECT set_config('lock_timeout', '200ms', true)"))
    task_id = uuid.uuid4()
    with db.engine.connect() as creator:
        creator.execute(runs.CREATION_LOCK, {"task_id": task_id})
        assert lease.take(task_id, "w", 60) is lease.Refused.HELD
        creator.rollback()
    assert "still open" in caplog.text


def test_a_commit_the_pool_lost_is_sent_again_on_a_fresh_connection(org_id: uuid.UUID) -> None:
    """Every pooled backend terminated (a database restart) before the first round trip: the
    first batch goes again on a new connection; nothing was enqueued twice."""
    sent: list[uuid.UUID] = []
    runs.create_enqueued_run(org_id=org_id, job_name="hello", cause="manual", triggered_by=None,
                             rate=UNLIMITED, enqueue=sent.append)
    killed = db.session.execute(text(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'")).scalar()
    db.session.commit()
    assert killed and killed >= 1
    _, task_id = runs.create_enqueued_run(org_id=org_id, job_name="hello", cause="manual", triggered_by=None,
                                          rate=UNLIMITED, enqueue=sent.append)
    assert sent[-1] == task_id and len(sent) == 2
    held = lease.take(task_id, "w", 60)
    assert isinstance(held, lease.Lease)
