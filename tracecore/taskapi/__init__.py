"""The task API: the only platform calls a sandbox can make, over its capability token (``calls``),
and the check of the token's attempt they all make (``sql``).
Served by the worker's unix-socket gateway and by ``/v1/task/`` alike.

May import: every other room of ``tracecore``.
"""
