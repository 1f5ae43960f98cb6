"""agentd.store: the only package that talks to PostgreSQL (psycopg 3 driven natively by trio).

Trio code sees plain ``async def`` methods and dict rows or attrs records:

    async with open_database(url) as db:             # trio pool; statement_timeout on every connection,
        await migrate(db)                            # a client-side deadline on every call
        row = await db.fetchone("SELECT … %s", [x])
        async with db.transaction("repeatable read") as tx:
            await tx.execute(…)
        pubsub = PubSub(db)
        await nursery.start(pubsub.run)              # the LISTEN connection's owner task
        async with pubsub.subscribe(channel) as sub:
            async for payload in sub: …              # str, or MISSED after loss/overflow

Typed queries live in modules beside this one (``agents.py`` …); database failures arrive as
`agentd.store.errors` classes; ``embedded.py`` runs the default pgserver database.
"""

from agentd.store.db import Database, Params, Query, Transaction, asyncio_loop, open_database
from agentd.store.pubsub import MISSED, Missed, PubSub, Subscription

__all__ = [
    "MISSED",
    "Database",
    "Missed",
    "Params",
    "PubSub",
    "Query",
    "Subscription",
    "Transaction",
    "asyncio_loop",
    "open_database",
]
