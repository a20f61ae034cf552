"""The Query Service: which SQL may run (``policy``), the DuckDB engine (``engine``), saved queries,
downloads and the two entry points (``saved``).

May import: ``tracecore.db``, ``tracecore.data``, ``tracecore.tenancy``, ``tracecore.infra``,
``tracecore.settings``, ``tracecore.exceptions``.
"""
