"""Row -> attrs record plumbing shared by the typed query modules.

A record class lists the columns it reads as attrs fields named like the columns. `select_list`
renders ``alias.col AS prefixcol`` for a joined query and `from_row` picks them back out, so one
query can return several records without column-name clashes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import attrs
from psycopg import sql as pgsql

R = TypeVar("R")


def columns(cls: type[Any]) -> tuple[str, ...]:
    """Column names read by record class ``cls`` (its attrs fields, in order)."""
    return tuple(f.name for f in attrs.fields(cls))


def select_list(cls: type[Any], alias: str, prefix: str = "") -> pgsql.Composed:
    """``alias.c1 AS prefix_c1, alias.c2 AS prefix_c2, …`` for the columns of ``cls``."""
    return pgsql.SQL(", ").join(
        pgsql.SQL("{}.{} AS {}").format(
            pgsql.Identifier(alias), pgsql.Identifier(c), pgsql.Identifier(prefix + c)
        )
        for c in columns(cls)
    )


def from_row(cls: type[R], row: Mapping[str, Any], prefix: str = "") -> R:
    """Build ``cls`` from the ``prefix``-ed columns of ``row``."""
    return cls(**{c: row[prefix + c] for c in columns(cls)})


def as_tuple(value: Any) -> tuple[Any, ...]:
    """attrs converter: SQL arrays (lists, NULL) as immutable tuples."""
    return () if value is None else tuple(value)
