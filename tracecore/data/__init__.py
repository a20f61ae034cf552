"""The data plane: datasets, versions, partitions and grants (``datasets``, ``admin``), schemas
(``schema``), batch artifacts (``batches``), buffer-publish (``publish``), lineage (``lineage``) and
the raw SQL they run, hot tables' DDL included (``sql``).

May import: ``tracecore.db``, ``tracecore.tenancy``, ``tracecore.infra``, ``tracecore.settings``,
``tracecore.exceptions``.
"""
