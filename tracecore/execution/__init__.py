"""Execution: runs, tasks and attempts (``runs``), their states, outcomes and state machine
(``states``), the hot path's SQL (``sql``), DAG runs (``dag_runs``), leases and fences (``lease``),
the counter rows beside them (``counters``), capability tokens
(``tokens``), bundles (``bundles``), the operator catalog (``operators``) and redaction of what
sandboxes hand back (``redaction``).

May import: ``tracecore.db``, ``tracecore.tenancy``, ``tracecore.dags``, ``tracecore.data``, ``tracecore.infra``,
``tracecore.settings``, ``tracecore.exceptions``.
"""
