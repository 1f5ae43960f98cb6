"""agentd.store: the only package that talks to PostgreSQL (psycopg 3 via trio-asyncio).

Trio code uses `open_database` / `Database` / `Transaction` with dict rows and the typed query
modules beside this file (attrs records in and out); database failures arrive as `agentd.store.errors`.
"""

from agentd.store.db import Database, Params, Transaction, asyncio_loop, open_database

__all__ = ["Database", "Params", "Transaction", "asyncio_loop", "open_database"]
