"""Layering rule: nothing outside agentd/store imports psycopg, psycopg_pool, trio_asyncio or pgserver."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STORE_ONLY = {"psycopg", "psycopg_pool", "trio_asyncio", "pgserver"}


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_only_the_store_imports_database_drivers() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_roots(path) & STORE_ONLY)
        for path in (ROOT / "agentd").rglob("*.py")
        if "store" not in path.relative_to(ROOT / "agentd").parts[:1]
    }
    assert {k: v for k, v in offenders.items() if v} == {}
