"""The migrated schema equals the models.

Migrations run on an empty database and Alembic's ``compare_metadata`` must find nothing to
change (types, nullability, server defaults, indexes, unique constraints, foreign keys).
Alembic does not compare check constraints, partial-index predicates or triggers, so a
second database is created from the models (plus the state machine's live trigger SQL) and
PostgreSQL's own rendering of both catalogs must agree too. The negative tests show that
either comparison reports a column or a check constraint present in the models only.
"""

from __future__ import annotations

import ast
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import CheckConstraint, Column, Engine, Integer, MetaData, create_engine, text
from sqlalchemy.engine import make_url

import tracecore.db
from tracecore.db.engine import sqlalchemy_url
from tracecore.db.migrate import upgrade
from tracecore.db.models import Base
from tracecore.execution.runs import all_transition_triggers_sql
from tracecore.settings import Settings

# PostgreSQL's rendering of everything Alembic leaves out (and of what it covers, once more).
_CATALOG = {
    "columns": """SELECT table_name, column_name, data_type, character_maximum_length, numeric_precision,
                         is_nullable, column_default
                  FROM information_schema.columns WHERE table_schema = 'public'""",
    "constraints": """SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
                      FROM pg_constraint WHERE connamespace = 'public'::regnamespace""",
    "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'",
    "triggers": """SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid)
                   FROM pg_trigger WHERE NOT tgisinternal""",
    "functions": """SELECT proname, pg_get_functiondef(oid)
                    FROM pg_proc WHERE pronamespace = 'public'::regnamespace""",
}


def _include_name(name: str | None, type_: str, _parent: Any) -> bool:
    return not (type_ == "table" and name == "alembic_version")


def alembic_differences(engine: Engine, metadata: MetaData) -> list[Any]:
    """What ``alembic revision --autogenerate`` would write to bring ``engine`` to ``metadata``."""
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={
            "compare_type": True, "compare_server_default": True, "include_name": _include_name})
        return list(compare_metadata(context, metadata))


def catalog(engine: Engine) -> dict[str, set[tuple[Any, ...]]]:
    with engine.connect() as connection:
        found = {part: {tuple(row) for row in connection.execute(text(sql))} for part, sql in _CATALOG.items()}
    return {part: {row for row in rows if "alembic_version" not in row} for part, rows in found.items()}


def catalog_differences(left: Engine, right: Engine) -> dict[str, dict[str, set[tuple[Any, ...]]]]:
    """Per catalog part, the rows only ``left`` has and the rows only ``right`` has."""
    ours, theirs = catalog(left), catalog(right)
    return {part: {"only_left": ours[part] - theirs[part], "only_right": theirs[part] - ours[part]}
            for part in _CATALOG if ours[part] != theirs[part]}


@pytest.fixture(scope="module")
def scratch_database(services: Settings) -> Iterator[Callable[[], Engine]]:
    """Makes empty databases on the session's PostgreSQL server; drops them afterwards."""
    server = sqlalchemy_url(services.database_url or "")
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    made: list[tuple[str, Engine]] = []

    def make() -> Engine:
        name = f"trace_schema_{uuid.uuid4().hex[:12]}"
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        engine = create_engine(make_url(server).set(database=name))
        made.append((name, engine))
        return engine

    yield make
    for name, engine in made:
        engine.dispose()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="module")
def migrated(scratch_database: Callable[[], Engine]) -> Engine:
    engine = scratch_database()
    upgrade(engine.url.render_as_string(hide_password=False))
    return engine


def created_from(engine: Engine, metadata: MetaData) -> Engine:
    """``engine``'s database built from ``metadata`` and the live state-machine triggers."""
    metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(text(all_transition_triggers_sql()))
    return engine


def copied_metadata() -> MetaData:
    copy = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.sorted_tables:
        table.to_metadata(copy)
    return copy


def test_migrations_build_exactly_the_models(migrated: Engine) -> None:
    assert alembic_differences(migrated, Base.metadata) == []


def test_the_catalogs_of_migrated_and_model_built_databases_agree(
        migrated: Engine, scratch_database: Callable[[], Engine]) -> None:
    """Check constraints, index predicates, defaults and the state-machine triggers included."""
    assert catalog_differences(migrated, created_from(scratch_database(), Base.metadata)) == {}


def test_a_column_only_in_the_models_is_reported(migrated: Engine) -> None:
    metadata = copied_metadata()
    metadata.tables["runs"].append_column(Column("model_only", Integer, nullable=True))
    assert [diff[0] for diff in alembic_differences(migrated, metadata)] == ["add_column"]
    [(_, _, table, column)] = alembic_differences(migrated, metadata)
    assert (table, column.name) == ("runs", "model_only")


def test_a_check_constraint_only_in_the_models_is_reported(
        migrated: Engine, scratch_database: Callable[[], Engine]) -> None:
    metadata = copied_metadata()
    metadata.tables["tasks"].append_constraint(CheckConstraint("attempts_count <= 1000", name="model_only"))
    differences = catalog_differences(migrated, created_from(scratch_database(), metadata))
    assert set(differences) == {"constraints"}
    assert differences["constraints"]["only_left"] == set()
    assert differences["constraints"]["only_right"] == {
        ("tasks", "ck_tasks_model_only", "CHECK ((attempts_count <= 1000))")}


def test_no_migration_imports_the_project() -> None:
    """A migration that imports live code changes what fresh databases get when that code changes."""
    versions = Path(tracecore.db.__file__).parent / "migrations" / "versions"
    imported = {}
    for path in sorted(versions.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        modules = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        modules += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        imported[path.name] = sorted({module.split(".")[0] for module in modules})
    assert len(imported) >= 11
    assert {name: roots for name, roots in imported.items()
            if set(roots) - {"__future__", "alembic", "sqlalchemy"}} == {}
