"""What SQL the Query Service runs: exactly one SELECT, reading only the datasets it may read.

Kept apart from the engine (``tracecore.query.engine``) because it is pure: it reads no data, so it
judges a query before anything is registered (hostile SQL reads nothing) and judges a saved
query before it is stored.

The rules, and why:

- Exactly one statement, of type SELECT, by DuckDB's own parser (``extract_statements``):
  PRAGMA, SET/RESET, ATTACH, COPY, EXPORT, INSTALL/LOAD, DDL and DML are other statement types,
  and ``a; b`` is two statements. (400 ``not_select``)
- In the parse tree (``json_serialize_sql``): every table function must be one of
  ``ALLOWED_TABLE_FUNCTIONS`` (which read only their arguments), wherever it sits, a CTE
  included. ``read_csv``, ``read_text``, ``read_blob``, ``sniff_csv``, ``glob``, ``read_parquet``,
  ``query()`` (which would run SQL this check never saw), ``duckdb_*`` and ``pragma_*`` are
  refused by name, as is a quoted path used as a table (``FROM '/etc/passwd'``) and the few
  scalar functions that tell about the host. External access is off anyway at run time; this
  makes the refusal a clear 403 ``forbidden_function`` instead of a permission error.
- Every table must be a visible dataset or a CTE in scope. Anything else, system views
  (``duckdb_settings``, ``information_schema``) and another org's dataset included, is 400
  ``query_error`` "Table with name X does not exist!", as DuckDB itself would say.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import duckdb

from tracecore.exceptions import UserError
from tracecore.infra.strict_json import nesting_depth

# Table functions that read nothing but their arguments. Everything else (read_*, glob, sniff_csv,
# query, query_table, duckdb_*, pragma_*, parquet_metadata, ...) is refused by name.
ALLOWED_TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest", "json_each", "json_tree"})
# Scalar functions that tell about the host or write somewhere.
FORBIDDEN_FUNCTIONS = frozenset({"current_setting", "getenv", "write_log"})
MAX_SQL_CHARS = 100_000
MAX_TREE_DEPTH = 500  # levels of json_serialize_sql's tree: ~165 levels of nested SQL (the walk recurses per level)
_PATHLIKE = re.compile(r"[/\\:.]")
# The checker's own connection: no data, nothing to load, a small memory limit.
_CHECK_CONFIG: dict[str, Any] = {
    "autoinstall_known_extensions": False, "autoload_known_extensions": False, "python_enable_replacements": False,
    "temp_directory": "", "memory_limit": "64MB", "threads": 1}


class QueryError(UserError):
    """The user's SQL failed in DuckDB (syntax, unknown table or column, bad cast, ...)."""

    code = "query_error"


class QueryTooComplex(UserError):
    """The SQL nests subqueries or expressions deeper than the checker analyses."""

    code = "query_too_complex"


class NotSelect(UserError):
    """The SQL is not exactly one SELECT statement."""

    code = "not_select"


class ForbiddenFunction(UserError):
    """The SQL names a table function (or a path) that could read outside the registered datasets."""

    code = "forbidden_function"
    http_status = 403


class QueryTimeout(UserError):
    code = "query_timeout"
    http_status = 408


class QueryResourceLimit(UserError):
    """The query needed more memory than ``memory_limit``: the query's fault, not the platform's."""

    code = "query_resource_limit"
    http_status = 422


class QueryResultTooLarge(UserError):
    """The answer (inline rows or an export file) passed its byte cap: the query's fault, like memory."""

    code = "query_result_too_large"
    http_status = 422



def check_sql(sql: str, visible: Iterable[str] | None, *, connection: duckdb.DuckDBPyConnection | None = None
              ) -> frozenset[str]:
    """Refuse anything but one SELECT over ``visible`` datasets; answer the (lower-case) names it reads.

    Raises ``NotSelect``, ``ForbiddenFunction`` or ``QueryError`` (unknown table, syntax).
    ``visible`` None judges the statement and its functions only, not its tables (a saved
    query, whose tables are decided when it runs). Pure: it reads no data.
    """
    own = connection is None
    con = connection if connection is not None else duckdb.connect(":memory:", config=_CHECK_CONFIG)
    try:
        statement = _one_select(con, sql)
        rows = con.execute("SELECT json_serialize_sql(?::VARCHAR)", [statement]).fetchall()
    except duckdb.Error as exc:
        raise QueryError(clean_message(str(exc))) from None
    finally:
        if own:
            con.close()
    serialized = rows[0][0].encode()
    # About three levels of tree per level of SQL nesting; deeper would exhaust Python's recursion.
    if nesting_depth(serialized, MAX_TREE_DEPTH) > MAX_TREE_DEPTH:
        raise QueryTooComplex(f"the SQL nests too deeply to analyse (its parse tree passes {MAX_TREE_DEPTH} levels)",
                              details={"limit": MAX_TREE_DEPTH})
    tree = json.loads(serialized)
    if tree.get("error"):
        raise QueryError(clean_message(str(tree.get("error_message") or "the statement cannot be analysed")))
    found: set[str] = set()
    names = None if visible is None else {name.lower() for name in visible}
    _walk(tree.get("statements", []), frozenset(), names, found)
    return frozenset(found)


def check_statement(sql: str) -> None:
    """One SELECT using allowed functions only; tables are not judged (see ``check_sql``)."""
    check_sql(sql, None)


def _one_select(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    if not isinstance(sql, str) or not sql.strip():
        raise NotSelect("send one SELECT statement")
    if len(sql) > MAX_SQL_CHARS:
        raise UserError(f"the SQL is longer than {MAX_SQL_CHARS} characters", code="sql_too_long")
    statements = con.extract_statements(sql)
    if len(statements) != 1:
        raise NotSelect(f"send exactly one SELECT statement; this SQL has {len(statements)}",
                        details={"statements": len(statements)})
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        spelled = "an INSTALL/LOAD" if kind.name == "LOAD" else f"a {kind.name}"
        raise NotSelect(f"only SELECT is allowed; this is {spelled} statement",
                        details={"statement_type": kind.name})
    return sql


def _walk(node: Any, scope: frozenset[str], visible: set[str] | None, found: set[str]) -> None:
    """Visit the parse tree; CTE names are in scope for the node that defines them and below."""
    if isinstance(node, list):
        for item in node:
            _walk(item, scope, visible, found)
        return
    if not isinstance(node, dict):
        return
    ctes = node.get("cte_map")
    if isinstance(ctes, dict):
        scope = scope | {str(entry.get("key", "")).lower() for entry in ctes.get("map", []) if isinstance(entry, dict)}
    if node.get("type") == "RECURSIVE_CTE_NODE" and node.get("cte_name"):
        scope = scope | {str(node["cte_name"]).lower()}
    kind = node.get("type")
    if kind == "BASE_TABLE" or (kind == "SHOW_REF" and node.get("table_name")):
        _table_reference(node, scope, visible, found)
    elif kind == "TABLE_FUNCTION":
        _table_function(node.get("function"))
    if node.get("class") == "FUNCTION" and str(node.get("function_name", "")).lower() in FORBIDDEN_FUNCTIONS:
        raise ForbiddenFunction(f"the function {node['function_name']}() is not allowed in the Query Service",
                                details={"function": node["function_name"]})
    for value in node.values():
        if isinstance(value, (dict, list)):
            _walk(value, scope, visible, found)


def _table_reference(node: dict[str, Any], scope: frozenset[str], visible: set[str] | None, found: set[str]
                     ) -> None:
    name = str(node.get("table_name", ""))
    schema, catalog = str(node.get("schema_name") or ""), str(node.get("catalog_name") or "")
    lowered = name.lower()
    if not schema and not catalog and lowered in scope:
        return  # a CTE
    if visible is None:
        return  # a saved query: its tables are judged when it runs
    if lowered in visible and schema.lower() in ("", "main") and catalog.lower() in ("", "memory"):
        found.add(lowered)
        return
    if _PATHLIKE.search(name) and not schema and not catalog:
        raise ForbiddenFunction("reading files by path is not allowed; query the datasets by name",
                                details={"table": name})
    qualified = ".".join(part for part in (catalog, schema, name) if part)
    raise QueryError(f"Catalog Error: Table with name {qualified} does not exist!", details={"table": qualified})


def _table_function(function: Any) -> None:
    if not isinstance(function, dict) or function.get("class") != "FUNCTION":
        raise ForbiddenFunction("this table reference is not allowed in the Query Service")
    name = str(function.get("function_name", ""))
    qualified = bool(function.get("schema") or function.get("catalog"))
    if name.lower() not in ALLOWED_TABLE_FUNCTIONS or qualified:
        allowed = ", ".join(sorted(ALLOWED_TABLE_FUNCTIONS))
        raise ForbiddenFunction(f"the table function {name}() is not allowed in the Query Service "
                                f"(allowed: {allowed}); query the datasets by name", details={"function": name})


# ---------------------------------------------------------------------------------------------
# Errors: DuckDB's message, without this host's paths.

def _host_paths() -> list[tuple[str, str]]:
    paths = [(tempfile.gettempdir(), "<tmp>"), (os.getcwd(), "<cwd>"), (sys.prefix, "<python>"),
             (str(Path.home()), "~")]
    return sorted({(p, label) for p, label in paths if p and p != "/"}, key=lambda item: -len(item[0]))


def clean_message(message: str, extra_paths: Sequence[tuple[str, str]] = ()) -> str:
    """Take host paths (object store root, temp dir, home, ...) out of an error message."""
    for path, label in sorted(extra_paths, key=lambda item: -len(item[0])) + _host_paths():
        message = message.replace(path, label)
    return message.strip()


