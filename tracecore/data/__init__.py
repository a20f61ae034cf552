"""The data plane: datasets, versions, partitions and grants (``datasets``, ``admin``), schemas
(``schema``), batch artifacts (``batches``), buffer-publish (``publish``) and lineage (``lineage``).

May import: ``tracecore.db``, ``tracecore.tenancy``, ``tracecore.infra``, ``tracecore.settings``,
``tracecore.exceptions``.
"""
