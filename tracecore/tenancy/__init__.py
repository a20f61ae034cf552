"""Tenancy: orgs, users, memberships and roles, API tokens (``orgs``), the audit log (``audit``).

May import: ``tracecore.db``, ``tracecore.settings``, ``tracecore.exceptions``.
"""
