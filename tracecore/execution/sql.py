"""The hot path's SQL of execution, in one place: the lease (take, renew, close, fence, reap), the
creation of a run (one statement, or the admitted and enqueued path of ``runs.create_enqueued_run``)
and a DAG run's gate and cancellation.

Each statement is one round trip that does all its work in the server; the comments say why
each is shaped as it is. The states they spell are those of ``states.py``. ``lease.py``,
``runs.py`` and ``dag_runs.py`` say when each runs.
"""

from __future__ import annotations

from sqlalchemy import text

from tracecore.execution.states import TERMINAL_TASK_STATES, quoted

# PostgreSQL NOTIFY channel: payload "<run id> <state>" when a run finishes.
RUN_FINISHED_CHANNEL = "trace_run_finished"

_TERMINAL = quoted(TERMINAL_TASK_STATES)

# One task of a run reached a terminal state: count it; the last one finishes the run.
_COUNT_CLOSED_TASK = """
  UPDATE runs SET open_tasks = open_tasks - 1, failed_tasks = failed_tasks + {failed},
         state = CASE WHEN open_tasks > 1 THEN state
                      WHEN failed_tasks + {failed} > 0 THEN 'failed' ELSE 'succeeded' END,
         finished_at = CASE WHEN open_tasks > 1 THEN finished_at ELSE now() END
  WHERE id = {run_id} AND state NOT IN ('succeeded', 'failed', 'canceled') {only_if}
  RETURNING id, state, finished_at IS NOT NULL AS finished"""

_CLOSE_RUN = _COUNT_CLOSED_TASK.format(
    run_id="(SELECT run_id FROM freed)",
    failed="CASE WHEN CAST(:task_state AS varchar) = 'succeeded' THEN 0 ELSE 1 END",
    only_if=f"AND CAST(:task_state AS varchar) IN ({_TERMINAL}) AND EXISTS (SELECT 1 FROM closed)")

# Lock order, in every statement that touches them: the task row(s), then org_running rows,
# then job_running rows (each by id), then the run row. Dependencies between the CTEs below
# force that order (PostgreSQL runs CTEs on demand), so concurrent leases never deadlock.
_TAKEABLE_WHERE = "(state IN ('queued', 'retrying') OR (state = 'running' AND lease_expires_at < now()))"

# The lease in one statement. A task taken over from an expired lease keeps its slot (it was
# counted when first leased); any other take needs a free slot in its org's counter row and its
# job's, both locked (FOR UPDATE) before the check, so two workers never share the last slot.
# ``verdict``: ok, gone (another worker holds it, or it is done), full (a cap is reached: the
# task waits), missing (a counter row does not exist yet: take() creates it and tries again),
# unseen (no such task: its creator has not committed yet, or rolled back; take() waits on the
# creation lock and tries again).
TAKE = text(f"""
WITH candidate AS MATERIALIZED (
  SELECT id, org_id, job_id, state = 'running' AS transfer FROM tasks
  WHERE id = :task_id AND {_TAKEABLE_WHERE} FOR UPDATE
), org_slot AS MATERIALIZED (
  SELECT org_id, running FROM org_running
  WHERE org_id = (SELECT org_id FROM candidate WHERE NOT transfer) FOR UPDATE
), job_slot AS MATERIALIZED (
  SELECT job_running.job_id, job_running.running,
         COALESCE(CAST(jobs.spec->>'max_concurrency' AS integer), 2147483647) AS cap
  FROM job_running JOIN jobs ON jobs.id = job_running.job_id
  WHERE job_running.job_id = (SELECT job_id FROM candidate WHERE NOT transfer)
    AND (SELECT running FROM org_slot) < :org_cap
  FOR UPDATE OF job_running
), verdict AS MATERIALIZED (
  SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM candidate)
              THEN CASE WHEN EXISTS (SELECT 1 FROM tasks WHERE id = :task_id) THEN 'gone' ELSE 'unseen' END
              WHEN (SELECT transfer FROM candidate) THEN 'ok'
              WHEN NOT EXISTS (SELECT 1 FROM org_slot) THEN 'missing'
              WHEN (SELECT running FROM org_slot) >= :org_cap THEN 'full'
              WHEN NOT EXISTS (SELECT 1 FROM job_slot) THEN 'missing'
              WHEN (SELECT running >= cap FROM job_slot) THEN 'full'
              ELSE 'ok' END AS verdict
), org_bump AS (
  UPDATE org_running SET running = running + 1
  WHERE org_id = (SELECT org_id FROM org_slot) AND (SELECT verdict FROM verdict) = 'ok'
), job_bump AS (
  UPDATE job_running SET running = running + 1
  WHERE job_id = (SELECT job_id FROM job_slot) AND (SELECT verdict FROM verdict) = 'ok'
), leased AS (
  UPDATE tasks SET fence = fence + 1, lease_owner = :worker,
         lease_expires_at = now() + make_interval(secs => :ttl), state = 'running',
         attempts_count = attempts_count + 1, next_attempt_at = NULL, updated_at = now()
  WHERE id = (SELECT id FROM candidate) AND (SELECT verdict FROM verdict) = 'ok'
  RETURNING id, org_id, run_id, job_id, fence, attempts_count, max_retries, "window"
), lost AS (
  UPDATE attempts SET state = 'lost', exit_reason = 'worker_lost', finished_at = clock_timestamp(),
         error_message = 'the lease expired before the attempt finished'
  WHERE task_id = :task_id AND state = 'running' AND EXISTS (SELECT 1 FROM leased)
  RETURNING id
), started AS (
  UPDATE runs SET state = 'running', started_at = now()
  WHERE id = (SELECT run_id FROM leased) AND state = 'queued'
), recorded AS (
  -- After `lost` (the count forces it to run first): the stale attempt it closed is no
  -- longer live for the unique index on running attempts.
  INSERT INTO attempts (id, org_id, task_id, number, fence, worker, state)
  SELECT :attempt_id, org_id, id, attempts_count, fence, :worker, 'running' FROM leased
  WHERE (SELECT count(*) FROM lost) >= 0
  RETURNING id
)
SELECT verdict.verdict, leased.*, jobs.name AS job_name, jobs.operator, jobs.spec, runs.config_overrides,
       runs.parameters, (SELECT count(*) FROM recorded) AS recorded
FROM verdict LEFT JOIN (leased JOIN jobs ON jobs.id = leased.job_id JOIN runs ON runs.id = leased.run_id) ON true
""")

# Counter rows are made on first need (a new org or job), then never again.
ADD_COUNTERS = text("""
WITH task AS (SELECT org_id, job_id FROM tasks WHERE id = :task_id), org AS (
  INSERT INTO org_running (org_id) SELECT org_id FROM task ON CONFLICT DO NOTHING
)
INSERT INTO job_running (job_id) SELECT job_id FROM task ON CONFLICT DO NOTHING
""")

# How long take() waits for the creator of a task it cannot see yet (runs.create_enqueued_run)
# to end its transaction, which normally takes a fraction of a millisecond. Past it the message
# is dropped: the reaper's sweep sends a task that stays queued again.
WAIT_FOR_CREATOR = text("SELECT set_config('lock_timeout', '10s', true)")

# Close the task and its attempt; the run's counters make the last task to close
# finish the run in the same statement (row locks order concurrent closers).
CLOSE = text(f"""
WITH closed AS (
  UPDATE tasks SET state = CAST(:task_state AS varchar),
         finished_at = CASE WHEN CAST(:task_state AS varchar) IN ({_TERMINAL}) THEN now() END,
         next_attempt_at = CASE WHEN CAST(:task_state AS varchar) = 'retrying'
                                THEN now() + make_interval(secs => CAST(:delay AS double precision)) END,
         last_error = :error_message, updated_at = now()
  WHERE id = :task_id AND fence = :fence AND state = 'running' AND lease_expires_at > now()
  RETURNING run_id, state, org_id, job_id
), org_free AS (
  UPDATE org_running SET running = running - 1 WHERE org_id = (SELECT org_id FROM closed)
  RETURNING org_id
), job_free AS (
  UPDATE job_running SET running = running - 1
  WHERE job_id = (SELECT job_id FROM closed) AND (SELECT count(*) FROM org_free) >= 0
  RETURNING job_id
), freed AS (
  -- The run row is locked last (see the lock order above TAKE).
  SELECT run_id FROM closed WHERE (SELECT count(*) FROM job_free) >= 0
), attempt AS (
  UPDATE attempts SET state = CAST(:attempt_state AS varchar), exit_reason = :exit_reason,
         error_type = :error_type, error_message = :error_message, stack_trace = :stack_trace,
         result = CAST(:result AS jsonb), finished_at = clock_timestamp(), peak_memory_bytes = :peak_memory_bytes,
         log_location = :log_location, duration_ms = EXTRACT(EPOCH FROM clock_timestamp() - started_at) * 1000
  WHERE task_id = :task_id AND fence = :fence AND EXISTS (SELECT 1 FROM closed)
), run AS ({_CLOSE_RUN}
)
SELECT (SELECT count(*) FROM closed) AS closed, (SELECT state FROM run WHERE finished) AS run_state,
       (SELECT pg_notify('{RUN_FINISHED_CHANNEL}', id::text || ' ' || state) FROM run WHERE finished) AS notified,
       -- whether a live composite trigger of the org names the job (confirmed by the caller on the
       -- parsed tree): the after-success hook then has work to do, else it costs nothing
       EXISTS (SELECT 1 FROM closed JOIN jobs AS c ON c.org_id = closed.org_id
               WHERE closed.state = 'succeeded' AND c.deleted_at IS NULL
                 AND jsonb_typeof(c.spec->'trigger') = 'object'
                 AND position(CAST(to_jsonb(CAST(:job_name AS text)) AS text) IN CAST(c.spec->'trigger' AS text)) > 0
       ) AS named_by_composite
""")

FENCED = text("""
UPDATE attempts SET state = 'fenced', exit_reason = 'fenced', finished_at = clock_timestamp(),
       error_message = 'refused: the task was leased to a newer attempt or the lease expired'
WHERE task_id = :task_id AND fence = :fence AND state IN ('running', 'lost')
""")

RENEW = text("""
UPDATE tasks SET lease_expires_at = now() + make_interval(secs => :ttl)
WHERE id = :task_id AND fence = :fence AND state = 'running' AND lease_expires_at > now()
""")

ASSERT_CURRENT = text("""
SELECT 1 FROM tasks WHERE id = :task_id AND fence = :fence AND state = 'running' AND lease_expires_at > now()
FOR SHARE
""")


REAP = text("""
WITH expired AS (
  SELECT id FROM tasks WHERE state = 'running' AND lease_expires_at < now() FOR UPDATE SKIP LOCKED
), lost AS (
  UPDATE attempts SET state = 'lost', exit_reason = 'worker_lost', finished_at = clock_timestamp(),
         error_message = 'the worker stopped renewing its lease (killed or hung)'
  WHERE task_id IN (SELECT id FROM expired) AND state = 'running'
), requeued AS (
  UPDATE tasks SET state = CASE WHEN attempts_count > max_retries THEN 'dead_letter' ELSE 'queued' END,
         finished_at = CASE WHEN attempts_count > max_retries THEN now() END,
         last_error = 'worker lost: the lease expired', lease_owner = NULL, lease_expires_at = NULL,
         updated_at = now()
  WHERE id IN (SELECT id FROM expired)
  RETURNING id, run_id, state, org_id, job_id
), org_lock AS MATERIALIZED (  -- counter rows locked in id order (see the lock order above TAKE)
  SELECT org_id FROM org_running WHERE org_id IN (SELECT org_id FROM requeued) ORDER BY org_id FOR UPDATE
), org_free AS (
  UPDATE org_running SET running = running - freed.n
  FROM (SELECT org_id, count(*) AS n FROM requeued GROUP BY org_id) AS freed
  WHERE org_running.org_id = freed.org_id AND org_running.org_id IN (SELECT org_id FROM org_lock)
  RETURNING org_running.org_id
), job_lock AS MATERIALIZED (
  SELECT job_id FROM job_running WHERE job_id IN (SELECT job_id FROM requeued)
    AND (SELECT count(*) FROM org_free) >= 0
  ORDER BY job_id FOR UPDATE
), job_free AS (
  UPDATE job_running SET running = running - freed.n
  FROM (SELECT job_id, count(*) AS n FROM requeued GROUP BY job_id) AS freed
  WHERE job_running.job_id = freed.job_id AND job_running.job_id IN (SELECT job_id FROM job_lock)
), forgotten AS (
  UPDATE tasks SET updated_at = now()
  WHERE id IN (SELECT id FROM tasks WHERE (state = 'queued' AND updated_at < now() - make_interval(secs => :stale))
                  OR (state = 'retrying' AND next_attempt_at < now() - make_interval(secs => :stale))
               FOR UPDATE SKIP LOCKED)
  RETURNING id, org_id
)
SELECT id, run_id, state, org_id FROM requeued UNION ALL SELECT id, NULL, 'queued', org_id FROM forgotten
""")

COUNT_DEAD_TASK = text(_COUNT_CLOSED_TASK.format(run_id=":run_id", failed="1", only_if=""))


_RUN_AND_TASK = """
run AS (
  INSERT INTO runs (id, org_id, job_id, dag_id, cause, triggered_by, parameters, config_overrides, state,
                    open_tasks, failed_tasks)
  SELECT :run_id, :org_id, job.id, :dag_id, :cause, :triggered_by, CAST(:parameters AS jsonb),
         CAST(:config_overrides AS jsonb), 'queued', 1, 0 FROM job
  WHERE {admitted}
  RETURNING id
), task AS (
  INSERT INTO tasks (id, org_id, run_id, job_id, partition_key, "window", state, fence, attempts_count,
                     max_retries)
  SELECT :task_id, :org_id, run.id, job.id, '', CAST(:window AS jsonb), 'queued', 0, 0, job.max_retries
  FROM run, job
  RETURNING id
)"""
_JOB_COLUMNS = "id, coalesce((spec->>'max_retries')::int, 3) AS max_retries"
_JOB = f"""job AS (
  SELECT {_JOB_COLUMNS} FROM jobs WHERE org_id = :org_id AND name = :job_name AND deleted_at IS NULL
)"""
# The org's count of API-triggered runs in the current fixed window (by the database's clock),
# upserted under the row's lock: two API processes cannot both admit the last run of a window.
_RATE = """rate AS (
  INSERT INTO org_run_rate AS counted (org_id, window_index, runs)
  VALUES (:org_id, floor(extract(epoch FROM now()) / :rate_window), 1)
  ON CONFLICT (org_id) DO UPDATE
    SET runs = CASE WHEN counted.window_index = EXCLUDED.window_index THEN counted.runs + 1 ELSE 1 END,
        window_index = EXCLUDED.window_index
  RETURNING runs, CAST(ceil((window_index + 1) * :rate_window - extract(epoch FROM now())) AS integer)
            AS retry_after
)"""
CREATE_RUN = text(f"WITH {_JOB}, {_RUN_AND_TASK.format(admitted='true')} SELECT id FROM task")

# Held by the transaction that creates a task when it enqueues the task before committing
# (create_enqueued_run); a worker that finds no such task waits on it, then looks again
# (tracecore/execution/lease.py). Transaction-scoped: the commit or the rollback releases it.
CREATION_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended(CAST(:task_id AS text), 11))")
ADMIT = text(f"WITH {_RATE}, {_JOB} SELECT rate.runs, rate.retry_after, (SELECT id FROM job) AS job_id FROM rate")
INSERT_ADMITTED = text(f"""WITH job AS (
  SELECT {_JOB_COLUMNS} FROM jobs WHERE id = :job_id AND deleted_at IS NULL
), {_RUN_AND_TASK.format(admitted='true')} SELECT id FROM task""")
COUNT_RUN = text(f"WITH {_RATE} SELECT runs, retry_after FROM rate")


# -- DAG runs (dag_runs.py) ------------------------------------------------------------------------

# One row: the task's state and spec, and the (job, state) of the run's other tasks. Run on the
# autocommit connection (no session BEGIN/COMMIT): the gate (``dag_runs.gate``) sits on every
# hand-off of a DAG run.
UPSTREAM_STATES = text("""
SELECT t.state, j.spec,
       (SELECT coalesce(json_agg(json_build_array(uj.name, up.state)), '[]') FROM tasks AS up
        JOIN jobs AS uj ON uj.id = up.job_id WHERE up.run_id = t.run_id AND up.id <> t.id) AS others
FROM tasks AS t JOIN jobs AS j ON j.id = t.job_id
WHERE t.id = :task_id
""")

# A DAG run's open tasks downstream of a dead-lettered one (``dag_runs.cancel_downstream``): each
# canceled task is counted as failed; the run finishes ``failed`` when none is left open.
CANCEL_DOWNSTREAM = text(f"""
WITH canceled AS (
  UPDATE tasks SET state = 'canceled', finished_at = now(), updated_at = now(), last_error = :why,
         lease_owner = NULL, lease_expires_at = NULL
  WHERE id = ANY(CAST(:ids AS uuid[])) AND state IN ('queued', 'retrying')
  RETURNING run_id
), n AS (SELECT count(*) AS n FROM canceled), run AS (
  UPDATE runs SET open_tasks = open_tasks - n.n, failed_tasks = failed_tasks + n.n,
         state = CASE WHEN open_tasks > n.n THEN state ELSE 'failed' END,
         finished_at = CASE WHEN open_tasks > n.n THEN finished_at ELSE now() END
  FROM n WHERE runs.id = :run_id AND n.n > 0 AND runs.state NOT IN ('succeeded', 'failed', 'canceled')
  RETURNING runs.id, runs.state, runs.finished_at IS NOT NULL AS finished
)
SELECT (SELECT n FROM n) AS canceled,
       (SELECT pg_notify('{RUN_FINISHED_CHANNEL}', id::text || ' ' || state) FROM run WHERE finished) AS notified
""")
