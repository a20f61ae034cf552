"""DAGs: the DAG file's text level (``text``), its validation into frozen specs (``spec``,
``trigger_spec``, ``bounds``; an ``http_ingest`` job's config, allowlist and records in ``http_feed``),
stored DAGs, versions and jobs (``catalog``), and the time and
webhook triggers derived from them (``triggers``), and the raw SQL the schedule trigger runs (``sql``).

May import: ``tracecore.db``, ``tracecore.tenancy``, ``tracecore.execution.operators``, ``tracecore.data.schema``,
``tracecore.settings``, ``tracecore.exceptions``.
"""
