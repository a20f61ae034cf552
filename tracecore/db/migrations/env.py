"""Alembic environment: runs against the URL handed in by tracecore.db.migrate."""

from __future__ import annotations

import re
from typing import Any

from alembic import context
from sqlalchemy import create_engine, pool

from tracecore.db.engine import sqlalchemy_url
from tracecore.db.models import Base

config = context.config
target_metadata = Base.metadata

# Buffered datasets' hot tables (ds_<dataset id hex>) are made at run time, not by migrations.
_HOT_TABLE = re.compile(r"ds_[0-9a-f]{32}")


def include_name(name: str | None, type_: str, _parent: Any) -> bool:
    """Keeps autogenerate from proposing to drop the hot tables."""
    return not (type_ == "table" and name is not None and _HOT_TABLE.fullmatch(name))


def run_migrations_online() -> None:
    engine = create_engine(sqlalchemy_url(config.get_main_option("sqlalchemy.url") or ""), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, compare_type=True,
                          compare_server_default=True, include_name=include_name)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations_online()
