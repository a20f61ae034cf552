"""Alembic environment: runs against the URL handed in by tracecore.db.migrate."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from tracecore.db.engine import sqlalchemy_url
from tracecore.db.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    engine = create_engine(sqlalchemy_url(config.get_main_option("sqlalchemy.url") or ""), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations_online()
