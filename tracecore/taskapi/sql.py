"""The task API's raw SQL, in one place: the check every task API call makes of its token's attempt.

Text rather than ORM because it is sent straight to psycopg on the autocommit connection
(``db.engine.execute_one``): it runs on every call a sandbox makes. ``calls.authenticate_token``
says what it decides.
"""

from __future__ import annotations

from sqlalchemy import text

# Whether the token's attempt is still the task's live one: one indexed lookup (tasks by id,
# attempts by the unique (task_id, fence)), on its own autocommit connection so that it holds no
# transaction open in the handler's session.
ATTEMPT_LIVE = text("""
SELECT tasks.fence AS task_fence, tasks.state AS task_state,
       tasks.lease_expires_at IS NOT NULL AND tasks.lease_expires_at > now() AS lease_live,
       attempts.state AS attempt_state
FROM tasks LEFT JOIN attempts ON attempts.task_id = tasks.id AND attempts.fence = :fence
WHERE tasks.id = :task_id AND tasks.org_id = :org_id AND tasks.run_id = :run_id
""")
