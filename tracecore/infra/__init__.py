"""Infrastructure behind small interfaces: the object store (``storage``), the credential broker
(``credentials``), embedded PostgreSQL and Redis (``embedded``), strict decoding of outside JSON
(``strict_json``).

May import: ``tracecore.settings``, ``tracecore.exceptions`` (and ``tracecore.execution.tokens`` for the broker).
"""
