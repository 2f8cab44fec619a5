"""SEC-02 lint: no SQL built by string formatting in the product's source (gateway/, adapters/).

Queries are built from SQLAlchemy ``Table``/``Column`` objects with bound values. This lint walks
the AST of every module (not tests/) and fails on a call to ``text(...)`` / ``sqlalchemy.text(...)``
/ ``sa.text(...)`` or ``<anything>.execute(...)`` / ``.exec_driver_sql(...)`` whose SQL argument is
built from strings at run time: an f-string, ``"..." + x`` / ``"..." % x``, or ``"...".format(...)``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("gateway", "adapters")
SQL_CALLS_BY_NAME = {"text"}  # text(...), from sqlalchemy import text
SQL_METHODS = {"text", "execute", "exec_driver_sql"}  # sa.text(...), conn.execute(...), cursor.execute(...)


def _is_dynamic_string(node: ast.AST) -> bool:
    """True for an expression that formats a string at run time."""
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(v, ast.FormattedValue) for v in node.values) or len(node.values) > 1
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):
        return _has_str(node.left) or _has_str(node.right) or _is_dynamic_string(node.left) or _is_dynamic_string(node.right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        return _has_str(node.func.value)
    return False


def _has_str(node: ast.AST) -> bool:
    return (isinstance(node, ast.Constant) and isinstance(node.value, str)) or isinstance(node, ast.JoinedStr) or (
        isinstance(node, ast.BinOp) and (_has_str(node.left) or _has_str(node.right))
    )


def _sql_argument(call: ast.Call) -> ast.AST | None:
    func = call.func
    is_sql = (isinstance(func, ast.Name) and func.id in SQL_CALLS_BY_NAME) or (
        isinstance(func, ast.Attribute) and func.attr in SQL_METHODS
    )
    if not is_sql:
        return None
    if call.args:
        return call.args[0]
    return next((k.value for k in call.keywords if k.arg in ("text", "statement", "sql", "query")), None)


def violations(source: str, filename: str = "<src>") -> list[str]:
    """``file:line: code`` for every SQL call whose statement is a run-time formatted string."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Call):
            arg = _sql_argument(node)
            if arg is not None and _is_dynamic_string(arg):
                found.append(f"{filename}:{node.lineno}: {ast.unparse(node)[:120]}")
    return found


def _product_files() -> list[Path]:
    return sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)


def test_the_lint_scans_the_product_source() -> None:
    files = _product_files()
    assert len(files) > 50 and any(p.parts[-2:] == ("sql", "__init__.py") or "sql" in p.parts for p in files)


def test_no_sql_is_built_by_string_formatting() -> None:
    found = [v for p in _product_files() for v in violations(p.read_text(), str(p.relative_to(ROOT)))]
    assert not found, "SQL built from formatted strings (use Table/Column objects and bound values):\n" + "\n".join(found)


@pytest.mark.parametrize("code", [
    'text(f"SELECT * FROM {table}")',
    "text(f'SELECT {col} FROM t')",
    'sqlalchemy.text(f"DELETE FROM {t}")',
    'sa.text("SELECT * FROM " + table)',
    'conn.execute(f"SELECT * FROM {table}")',
    "cursor.execute(f'INSERT INTO t VALUES ({v})')",
    'conn.execute("SELECT * FROM %s" % table)',
    'conn.execute(text("SELECT * FROM " + t + " WHERE 1=1"))',
    'conn.exec_driver_sql("SELECT * FROM {}".format(t))',
    'conn.execute(statement=f"SELECT {x}")',
])
def test_the_lint_flags_formatted_sql(code: str) -> None:
    assert violations(code), code


@pytest.mark.parametrize("code", [
    'text("SELECT 1")',
    'conn.execute(text("SELECT * FROM t WHERE id = :id"), {"id": value})',
    "conn.execute(select(table).where(table.c.id == value))",
    'conn.execute(text("SELECT 1 " "FROM t"))',  # implicit concatenation of literals is one constant
    'log.info(f"polled {n} rows")',
    'cursor.execute(sql, params)',
])
def test_the_lint_allows_static_or_bound_sql(code: str) -> None:
    assert not violations(code), code
