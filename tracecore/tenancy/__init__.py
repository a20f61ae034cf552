"""Tenancy: orgs, users, memberships and roles, API tokens (``orgs``), the audit log (``audit``), the
token lookup every API request makes (``sql``).

May import: ``tracecore.db``, ``tracecore.settings``, ``tracecore.exceptions``.
"""
