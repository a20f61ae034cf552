"""Schema migrations (Alembic), run by `trace db upgrade` and by `trace up`."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text

from tracecore.db.engine import sqlalchemy_url

# Serializes concurrent upgrades (two `trace up` on one database, parallel test workers).
_LOCK_KEY = 0x7472616365  # "trace"


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", "tracecore.db:migrations")
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    engine = create_engine(sqlalchemy_url(database_url))
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _LOCK_KEY})
            try:
                command.upgrade(alembic_config(database_url), revision)
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _LOCK_KEY})
    finally:
        engine.dispose()
