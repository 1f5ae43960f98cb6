"""Bind psycopg to trio-asyncio's view of the running loop, whatever the import order.

trio-asyncio replaces ``asyncio.get_running_loop`` when it is imported; ``psycopg.waiting`` copies
that function into its own namespace when *it* is imported. If psycopg was imported first, its copy
would never see the trio-asyncio loop ("no running event loop"), so rebind it here.
"""

from __future__ import annotations

import asyncio

import psycopg.waiting
import trio_asyncio  # type: ignore[import-untyped]  # noqa: F401  (import patches asyncio)

if getattr(psycopg.waiting, "get_running_loop", None) is not asyncio.get_running_loop:
    setattr(psycopg.waiting, "get_running_loop", asyncio.get_running_loop)  # noqa: B010
