"""The data plane's raw SQL, in one place: the statements ``datasets``, ``admin`` and ``publish``
run as text, and the builders of those that must name a buffered dataset's own hot table.

A hot table and its columns cannot be bind parameters, so their statements are built per call:
each name goes through :func:`quote_identifier` (psycopg's identifier quoting) and nothing else is
spliced in but column types from ``schema.pg_type`` and this module's own text. The names are
platform-made (``ds_<dataset id hex>``, ``_publish_<hex>``) or column names that
``schema.normalize_schema`` validated (``COLUMN_NAME_RE``); the quoting is belt and braces that
also keeps reserved words usable. Statements the publish path sends on its psycopg cursor use
psycopg's ``%(name)s`` parameters; the others are SQLAlchemy ``text()`` with ``:name``.
"""

from __future__ import annotations

from collections.abc import Sequence

from psycopg import sql as pgsql
from sqlalchemy import TextClause, text


def quote_identifier(identifier: str) -> str:
    """A PostgreSQL quoted identifier, as psycopg quotes one (``"name"``, inner quotes doubled)."""
    return pgsql.Identifier(identifier).as_string()


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


# -- reading (datasets) ------------------------------------------------------------------------

# The user a task reads PII for: who triggered its run, else who saved its job's DAG version.
ACCOUNTABLE_USER = text("""
SELECT coalesce(runs.triggered_by, dag_versions.created_by)
FROM runs LEFT JOIN jobs ON jobs.id = runs.job_id
LEFT JOIN dag_versions ON dag_versions.dag_id = jobs.dag_id AND dag_versions.version = jobs.dag_version
WHERE runs.id = :run_id
""")


# Whether a hot table exists, and the signature its comment records (what it was built from).
HOT_TABLE_STATE = text("SELECT to_regclass(:t) IS NOT NULL AS present, "
                       "obj_description(to_regclass(:t), 'pg_class') AS signature")

HOT_TABLE_COLUMNS = text("SELECT attname, attnotnull FROM pg_attribute WHERE attrelid = to_regclass(:t) "
                         "AND attnum > 0 AND NOT attisdropped")

# Which of the hot tables named exist (a dataset that never published has none).
PRESENT_TABLES = text("SELECT name FROM unnest(CAST(:names AS text[])) AS name WHERE to_regclass(name) IS NOT NULL")


# -- hot tables: DDL (datasets.ensure_hot_table) --------------------------------------------------


def column_ddl(name: str, pg_type: str, *, nullable: bool) -> str:
    """One column of a hot table: its quoted name, its PostgreSQL type, NOT NULL unless nullable."""
    not_null = "" if nullable else " NOT NULL"
    return f"{quote_identifier(name)} {pg_type}{not_null}"


def table_is_empty(table: str) -> TextClause:
    return text(f"SELECT NOT EXISTS (SELECT 1 FROM {quote_identifier(table)})")


def drop_table(table: str) -> TextClause:
    return text(f"DROP TABLE {quote_identifier(table)}")


def comment_on_table(table: str, comment: str) -> TextClause:
    """DDL takes no parameters: the comment (JSON the platform made) is a quoted literal."""
    return text(f"COMMENT ON TABLE {quote_identifier(table)} IS {_literal(comment)}")


def create_hot_table(table: str, columns: Sequence[str], unique_key: Sequence[str]) -> tuple[TextClause, TextClause]:
    """The table (``columns`` from :func:`column_ddl`, then the platform's own, and
    ``UNIQUE (org_id, <unique key>)`` when there is a key) and its index by version."""
    parts = [*columns, "org_id uuid NOT NULL", "_version integer NOT NULL",
             "_inserted_at timestamptz NOT NULL DEFAULT now()"]
    if unique_key:
        keys = ", ".join(quote_identifier(key) for key in unique_key)
        parts.append(f"CONSTRAINT {quote_identifier(f'uq_{table}_key')} UNIQUE (org_id, {keys})")
    quoted = quote_identifier(table)
    return (text(f"CREATE TABLE {quoted} ({', '.join(parts)})"),
            text(f"CREATE INDEX {quote_identifier(f'ix_{table}_version')} ON {quoted} (org_id, _version)"))


def add_column(table: str, column: str) -> TextClause:
    """``column`` from :func:`column_ddl`."""
    return text(f"ALTER TABLE {quote_identifier(table)} ADD COLUMN {column}")


def drop_not_null(table: str, column: str) -> TextClause:
    return text(f"ALTER TABLE {quote_identifier(table)} ALTER COLUMN {quote_identifier(column)} DROP NOT NULL")


# -- hot tables: redaction (admin.redact_rows) ---------------------------------------------------


def delete_by_key(table: str, key_types: Sequence[tuple[str, str]]) -> TextClause:
    """Delete the org's rows whose unique key equals the values bound as ``:k0``, ``:k1``, ... (text,
    cast to each key column's PostgreSQL type in the server); ``:org`` is the org."""
    clauses = [f"{quote_identifier(key)} = CAST(CAST(:k{index} AS text) AS {pg_type})"
               for index, (key, pg_type) in enumerate(key_types)]
    return text(f"DELETE FROM {quote_identifier(table)} WHERE org_id = :org AND " + " AND ".join(clauses))


# -- buffer-publish (publish) --------------------------------------------------------------------

# The task a capability token names, its job and the attempt of the token's fence.
PUBLISH_TARGET = text(
    "SELECT t.job_id, t.partition_key, j.name, j.spec, a.id AS attempt_id FROM tasks t "
    "JOIN jobs j ON j.id = t.job_id LEFT JOIN attempts a ON a.task_id = t.id AND a.fence = :fence "
    "WHERE t.id = :task AND t.org_id = :org")

# The rest of this part is sent on publish's psycopg cursor (``%(org)s``: the org, ``%(v)s``: the
# new version). An upsert's batch carries this column, its row order, so that the last row of a
# key wins.
ORDER_COLUMN = "__trace_ord"

# The INSERT sorts the batch by key (index locality); let that sort stay in memory.
PUBLISH_WORK_MEM = "SET LOCAL work_mem = '256MB'"


def create_temp_table(temp: str, columns: Sequence[tuple[str, str]], *, ordered: bool) -> str:
    """The batch's temp table: (name, PostgreSQL type) columns, plus :data:`ORDER_COLUMN` if ``ordered``."""
    ddl = ", ".join(f"{quote_identifier(name)} {pg_type}" for name, pg_type in columns)
    return f"CREATE TEMP TABLE {quote_identifier(temp)} ({ddl}{f', {ORDER_COLUMN} bigint' if ordered else ''}) " \
           "ON COMMIT DROP"


def copy_into(temp: str, names: Sequence[str], *, csv: bool) -> str:
    """COPY into the temp table, as CSV (Arrow's writer) or psycopg's rows."""
    columns = ", ".join(quote_identifier(name) for name in names)
    return f"COPY {quote_identifier(temp)} ({columns}) FROM STDIN{' (FORMAT csv)' if csv else ''}"


def delete_org_rows(hot: str) -> str:
    """A ``replace`` publish: the org's rows go first."""
    return f"DELETE FROM {quote_identifier(hot)} WHERE org_id = %(org)s"


def _insert(hot: str, temp: str, names: Sequence[str]) -> str:
    cols = ", ".join(quote_identifier(name) for name in names)
    return (f"INSERT INTO {quote_identifier(hot)} AS t ({cols}, org_id, _version) "
            f"SELECT {cols}, %(org)s, %(v)s FROM {quote_identifier(temp)}")


def insert_all(hot: str, temp: str, names: Sequence[str]) -> str:
    """Every row of the batch (a dataset without a unique key)."""
    return _insert(hot, temp, names)


def insert_new(hot: str, temp: str, names: Sequence[str], unique_key: Sequence[str]) -> str:
    """The rows whose key the org's table does not hold yet (append, replace)."""
    keys = ", ".join(quote_identifier(key) for key in unique_key)
    return f"{_insert(hot, temp, names)} ORDER BY {keys} ON CONFLICT (org_id, {keys}) DO NOTHING"


def upsert(hot: str, temp: str, names: Sequence[str], unique_key: Sequence[str]) -> str:
    """The batch's last row of each key, inserted or updated where a column differs (a row moves to
    the version that last changed it); answers one row: (inserted, updated)."""
    cols = ", ".join(quote_identifier(name) for name in names)
    keys = ", ".join(quote_identifier(key) for key in unique_key)
    others = [quote_identifier(name) for name in names if name not in unique_key]
    if others:
        action = (f"DO UPDATE SET {', '.join(f'{c} = EXCLUDED.{c}' for c in others)}, "
                  "_version = EXCLUDED._version, _inserted_at = now() "
                  f"WHERE ROW({', '.join(f't.{c}' for c in others)}) IS DISTINCT FROM "
                  f"ROW({', '.join(f'EXCLUDED.{c}' for c in others)})")
    else:
        action = "DO NOTHING"
    return (f"WITH written AS (INSERT INTO {quote_identifier(hot)} AS t ({cols}, org_id, _version) "
            f"SELECT DISTINCT ON ({keys}) {cols}, %(org)s, %(v)s FROM {quote_identifier(temp)} "
            f"ORDER BY {keys}, {ORDER_COLUMN} DESC "
            f"ON CONFLICT (org_id, {keys}) {action} RETURNING (xmax = 0) AS fresh) "
            "SELECT count(*) FILTER (WHERE fresh), count(*) FILTER (WHERE NOT fresh) FROM written")
