"""The database: the one SQLAlchemy handle and its fast paths (``engine``), the models'
aggregate (``models``), migrations and how they run (``migrate``, ``migrations/``).

May import: ``tracecore.settings``, ``tracecore.exceptions``; ``models`` imports every room's
models (it is the schema's table of contents). Migrations import nothing of the live code.
"""
