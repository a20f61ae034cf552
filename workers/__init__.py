"""Celery app, tasks, the dispatcher, sandbox backends and operators."""
