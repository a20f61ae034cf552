"""The raw SQL of the DAGs room, in one place: what the schedule trigger runs on every beat.

Everything else here goes through the ORM; these are text because each must be exactly one
statement (the tick's ``ON CONFLICT``) and run once per due tick. ``triggers.fire_due`` says
when each runs.
"""

from __future__ import annotations

from sqlalchemy import text

# A tick another beat already took inserts nothing: the unique key waits for that beat's
# transaction, then DO NOTHING (no id returned, no run made).
INSERT_TICK = text("""
INSERT INTO scheduled_ticks (id, org_id, job_id, scheduled_for)
VALUES (:id, :org_id, :job_id, :scheduled_for)
ON CONFLICT (job_id, scheduled_for) DO NOTHING RETURNING id
""")

# The tick names the run it made (same transaction).
SET_TICK_RUN = text("UPDATE scheduled_ticks SET run_id = :run_id WHERE id = :id")
