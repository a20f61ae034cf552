"""initial schema: tenancy, dags, runs, tasks, attempts, audit

Revision ID: 0001
Revises: 
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None

# The run/task/attempt state machine as tracecore/execution/runs.py compiled it at this revision
# (all_transition_triggers_sql()), frozen here: a migration never imports live code, so a later
# change to the transitions needs a new migration, and fresh and upgraded databases stay equal.
_STATE_MACHINE_SQL = """
CREATE OR REPLACE FUNCTION trace_runs_transition() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE allowed boolean;
BEGIN
  IF NEW.state IS DISTINCT FROM OLD.state THEN
    CASE OLD.state
    WHEN 'queued' THEN allowed := NEW.state IN ('running', 'succeeded', 'failed', 'canceled');
    WHEN 'running' THEN allowed := NEW.state IN ('succeeded', 'failed', 'canceled');
    WHEN 'succeeded' THEN allowed := NEW.state IN (NULL);
    WHEN 'failed' THEN allowed := NEW.state IN (NULL);
    WHEN 'canceled' THEN allowed := NEW.state IN (NULL);
    ELSE allowed := false;
    END CASE;
    IF NOT coalesce(allowed, false) THEN
      RAISE EXCEPTION 'runs: illegal state transition % -> %', OLD.state, NEW.state
        USING ERRCODE = 'check_violation';
    END IF;
  END IF;
  RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS trace_runs_transition ON runs;
CREATE TRIGGER trace_runs_transition BEFORE UPDATE ON runs
  FOR EACH ROW EXECUTE FUNCTION trace_runs_transition();

CREATE OR REPLACE FUNCTION trace_tasks_transition() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE allowed boolean;
BEGIN
  IF NEW.state IS DISTINCT FROM OLD.state OR (OLD.state = 'running' AND NEW.fence IS DISTINCT FROM OLD.fence) THEN
    CASE OLD.state
    WHEN 'queued' THEN allowed := NEW.state IN ('running', 'canceled');
    WHEN 'running' THEN allowed := NEW.state IN ('running', 'queued', 'retrying', 'succeeded', 'dead_letter', 'canceled');
    WHEN 'retrying' THEN allowed := NEW.state IN ('running', 'canceled');
    WHEN 'succeeded' THEN allowed := NEW.state IN (NULL);
    WHEN 'dead_letter' THEN allowed := NEW.state IN (NULL);
    WHEN 'canceled' THEN allowed := NEW.state IN (NULL);
    ELSE allowed := false;
    END CASE;
    IF NOT coalesce(allowed, false) THEN
      RAISE EXCEPTION 'tasks: illegal state transition % -> %', OLD.state, NEW.state
        USING ERRCODE = 'check_violation';
    END IF;
  END IF;
  IF NEW.fence < OLD.fence THEN
    RAISE EXCEPTION 'tasks.fence may only grow (% -> %)', OLD.fence, NEW.fence USING ERRCODE = 'check_violation';
  END IF;
  IF OLD.state = 'running' AND NEW.state = 'running' AND NEW.fence = OLD.fence
     AND NEW.lease_owner IS DISTINCT FROM OLD.lease_owner THEN
    RAISE EXCEPTION 'a new lease owner needs a new fence' USING ERRCODE = 'check_violation';
  END IF;
  RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS trace_tasks_transition ON tasks;
CREATE TRIGGER trace_tasks_transition BEFORE UPDATE ON tasks
  FOR EACH ROW EXECUTE FUNCTION trace_tasks_transition();

CREATE OR REPLACE FUNCTION trace_attempts_transition() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE allowed boolean;
BEGIN
  IF NEW.state IS DISTINCT FROM OLD.state THEN
    CASE OLD.state
    WHEN 'running' THEN allowed := NEW.state IN ('succeeded', 'failed', 'fenced', 'lost');
    WHEN 'lost' THEN allowed := NEW.state IN ('fenced');
    WHEN 'succeeded' THEN allowed := NEW.state IN (NULL);
    WHEN 'failed' THEN allowed := NEW.state IN (NULL);
    WHEN 'fenced' THEN allowed := NEW.state IN (NULL);
    ELSE allowed := false;
    END CASE;
    IF NOT coalesce(allowed, false) THEN
      RAISE EXCEPTION 'attempts: illegal state transition % -> %', OLD.state, NEW.state
        USING ERRCODE = 'check_violation';
    END IF;
  END IF;
  RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS trace_attempts_transition ON attempts;
CREATE TRIGGER trace_attempts_transition BEFORE UPDATE ON attempts
  FOR EACH ROW EXECUTE FUNCTION trace_attempts_transition();
"""


def upgrade() -> None:
    op.create_table('orgs',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_orgs')),
    sa.UniqueConstraint('name', name=op.f('uq_orgs_name'))
    )
    op.create_table('users',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('email', sa.String(length=254), nullable=False),
    sa.Column('is_installation_admin', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_users')),
    sa.UniqueConstraint('email', name=op.f('uq_users_email'))
    )
    op.create_table('api_tokens',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('org_id', sa.Uuid(), nullable=False),
    sa.Column('user_id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('display_prefix', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['org_id'], ['orgs.id'], name=op.f('fk_api_tokens_org_id_orgs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_api_tokens_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_tokens')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_api_tokens_token_hash'))
    )
    op.create_table('audit_log',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('org_id', sa.Uuid(), nullable=True),
    sa.Column('actor_id', sa.Uuid(), nullable=True),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('object_type', sa.String(length=32), nullable=False),
    sa.Column('object_id', sa.String(length=128), nullable=False),
    sa.Column('details', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['actor_id'], ['users.id'], name=op.f('fk_audit_log_actor_id_users')),
    sa.ForeignKeyConstraint(['org_id'], ['orgs.id'], name=op.f('fk_audit_log_org_id_orgs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_log'))
    )
    op.create_index('ix_audit_log_org_created', 'audit_log', ['org_id', 'created_at'], unique=False)
    op.create_table('dags',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('org_id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('current_version', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['org_id'], ['orgs.id'], name=op.f('fk_dags_org_id_orgs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_dags')),
    sa.UniqueConstraint('org_id', 'name', name=op.f('uq_dags_org_id_name'))
    )
    op.create_table('memberships',
    sa.Column('org_id', sa.Uuid(), nullable=False),
    sa.Column('user_id', sa.Uuid(), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("role IN ('reader', 'writer', 'admin')", name=op.f('ck_memberships_role')),
    sa.ForeignKeyConstraint(['org_id'], ['orgs.id'], name=op.f('fk_memberships_org_id_orgs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_memberships_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('org_id', 'user_id', name=op.f('pk_memberships'))
    )
    op.create_table('dag_versions',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('org_id', sa.Uuid(), nullable=False),
    sa.Column('dag_id', sa.Uuid(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('spec', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('created_by', sa.Uuid(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['created_by'], ['users.id'], name=op.f('fk_dag_versions_created_by_users')),
    sa.ForeignKeyConstraint(['dag_id'], ['dags.id'], name=op.f('fk_dag_versions_dag_id_dags'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['org_id'], ['orgs.id'], name=op.f('fk_dag_versions_org_id_orgs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_dag_versions')),
    sa.UniqueConstraint('dag_id', 'version', name=op.f('uq_dag_versions_dag_id_version'))
    )
    op.create_table('jobs',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('org_id', sa.Uuid(), nullable=False),
    sa.Column('dag_id', sa.Uuid(), nullable=False),
    sa.Column('dag_version', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('operator', sa.String(length=64), nullable=False),
    sa.Column('spec', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['dag_id'], ['dags.id'], name=op.f('fk_jobs_dag_id_dags'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['org_id'], ['orgs.id'], name=op.f('fk_jobs_org_id_orgs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs'))
    )
    op.create_index('uq_jobs_org_name_live', 'jobs', ['org_id', 'name'], unique=True, postgresql_where=sa.text('deleted_at IS NULL'))
    op.create_table('runs',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('org_id', sa.Uuid(), nullable=False),
    sa.Column('job_id', sa.Uuid(), nullable=True),
    sa.Column('dag_id', sa.Uuid(), nullable=True),
    sa.Column('cause', sa.String(length=16), nullable=False),
    sa.Column('triggered_by', sa.Uuid(), nullable=True),
    sa.Column('parameters', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('config_overrides', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('open_tasks', sa.Integer(), nullable=False),
    sa.Column('failed_tasks', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("(state IN ('succeeded', 'failed', 'canceled')) = (finished_at IS NOT NULL)", name=op.f('ck_runs_finished')),
    sa.CheckConstraint('open_tasks >= 0 AND failed_tasks >= 0', name=op.f('ck_runs_task_counts')),
    sa.CheckConstraint("cause IN ('schedule', 'webhook', 'data', 'dependency', 'composite', 'manual', 'rerun')", name=op.f('ck_runs_cause')),
    sa.CheckConstraint("state IN ('queued', 'running', 'succeeded', 'failed', 'canceled')", name=op.f('ck_runs_state')),
    sa.ForeignKeyConstraint(['dag_id'], ['dags.id'], name=op.f('fk_runs_dag_id_dags')),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_runs_job_id_jobs')),
    sa.ForeignKeyConstraint(['org_id'], ['orgs.id'], name=op.f('fk_runs_org_id_orgs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['triggered_by'], ['users.id'], name=op.f('fk_runs_triggered_by_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_runs'))
    )
    op.create_index('ix_runs_job_created', 'runs', ['job_id', 'created_at'], unique=False)
    op.create_index('ix_runs_org_created', 'runs', ['org_id', 'created_at'], unique=False)
    op.create_table('tasks',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('org_id', sa.Uuid(), nullable=False),
    sa.Column('run_id', sa.Uuid(), nullable=False),
    sa.Column('job_id', sa.Uuid(), nullable=False),
    sa.Column('partition_key', sa.String(length=256), nullable=False),
    sa.Column('window', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('fence', sa.BigInteger(), nullable=False),
    sa.Column('lease_owner', sa.String(length=256), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('attempts_count', sa.Integer(), nullable=False),
    sa.Column('max_retries', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("(state IN ('succeeded', 'dead_letter', 'canceled')) = (finished_at IS NOT NULL)", name=op.f('ck_tasks_finished')),
    sa.CheckConstraint("state <> 'retrying' OR next_attempt_at IS NOT NULL", name=op.f('ck_tasks_retry_has_time')),
    sa.CheckConstraint("state <> 'running' OR (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)", name=op.f('ck_tasks_running_has_lease')),
    sa.CheckConstraint("state IN ('queued', 'running', 'retrying', 'succeeded', 'dead_letter', 'canceled')", name=op.f('ck_tasks_state')),
    sa.CheckConstraint('fence >= 0', name=op.f('ck_tasks_fence')),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_tasks_job_id_jobs')),
    sa.ForeignKeyConstraint(['org_id'], ['orgs.id'], name=op.f('fk_tasks_org_id_orgs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], name=op.f('fk_tasks_run_id_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tasks'))
    )
    op.create_index('ix_tasks_lease_expiry', 'tasks', ['lease_expires_at'], unique=False, postgresql_where=sa.text("state = 'running'"))
    op.create_index('ix_tasks_run', 'tasks', ['run_id'], unique=False)
    op.create_index('ix_tasks_waiting', 'tasks', ['updated_at'], unique=False, postgresql_where=sa.text("state IN ('queued', 'retrying')"))
    op.create_table('attempts',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('org_id', sa.Uuid(), nullable=False),
    sa.Column('task_id', sa.Uuid(), nullable=False),
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('fence', sa.BigInteger(), nullable=False),
    sa.Column('worker', sa.String(length=256), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('exit_reason', sa.String(length=32), nullable=True),
    sa.Column('error_type', sa.String(length=256), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('stack_trace', sa.Text(), nullable=True),
    sa.Column('result', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), server_default=sa.text('clock_timestamp()'), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('duration_ms', sa.Double(), nullable=True),
    sa.Column('peak_memory_bytes', sa.BigInteger(), nullable=True),
    sa.Column('log_location', sa.Text(), nullable=True),
    sa.CheckConstraint("(state = 'running') = (finished_at IS NULL)", name=op.f('ck_attempts_finished')),
    sa.CheckConstraint("state IN ('running', 'lost', 'succeeded', 'failed', 'fenced')", name=op.f('ck_attempts_state')),
    sa.ForeignKeyConstraint(['org_id'], ['orgs.id'], name=op.f('fk_attempts_org_id_orgs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_attempts_task_id_tasks'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_attempts'))
    )
    op.create_index('uq_attempts_one_running', 'attempts', ['task_id'], unique=True, postgresql_where=sa.text("state = 'running'"))
    op.create_index('uq_attempts_task_fence', 'attempts', ['task_id', 'fence'], unique=True)

    # The run/task/attempt state machine, enforced by the database itself.
    op.execute(_STATE_MACHINE_SQL)


def downgrade() -> None:
    for table in ('runs', 'tasks', 'attempts'):
        op.execute(f'DROP TRIGGER IF EXISTS trace_{table}_transition ON {table}')
        op.execute(f'DROP FUNCTION IF EXISTS trace_{table}_transition()')
    op.drop_index('uq_attempts_task_fence', table_name='attempts')
    op.drop_index('uq_attempts_one_running', table_name='attempts', postgresql_where=sa.text("state = 'running'"))
    op.drop_table('attempts')
    op.drop_index('ix_tasks_waiting', table_name='tasks', postgresql_where=sa.text("state IN ('queued', 'retrying')"))
    op.drop_index('ix_tasks_run', table_name='tasks')
    op.drop_index('ix_tasks_lease_expiry', table_name='tasks', postgresql_where=sa.text("state = 'running'"))
    op.drop_table('tasks')
    op.drop_index('ix_runs_org_created', table_name='runs')
    op.drop_index('ix_runs_job_created', table_name='runs')
    op.drop_table('runs')
    op.drop_index('uq_jobs_org_name_live', table_name='jobs', postgresql_where=sa.text('deleted_at IS NULL'))
    op.drop_table('jobs')
    op.drop_table('dag_versions')
    op.drop_table('memberships')
    op.drop_table('dags')
    op.drop_index('ix_audit_log_org_created', table_name='audit_log')
    op.drop_table('audit_log')
    op.drop_table('api_tokens')
    op.drop_table('users')
    op.drop_table('orgs')
