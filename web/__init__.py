"""The Flask API and UI. Imports tracecore; the workers' Celery app only to enqueue."""
