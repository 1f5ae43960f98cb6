"""The trio-facing database handle: psycopg 3 driven natively by trio (`agentd.store.trio_pg`).

Every call takes a connection from a small trio pool, runs psycopg's protocol generators with trio
socket waits, and returns dict rows. Each call is bounded by a client-side deadline,
``query_timeout_s`` (default `DEFAULT_QUERY_TIMEOUT_S`, 8 s: below the agent's 10 s RPC timeout, so an
RPC fails with a database error the agent can see rather than its own timeout); it covers waiting for
a pooled connection and the statement, and fires even when the network drops packets, which the
server-side ``statement_timeout`` cannot. Connections use TCP keepalives and ``tcp_user_timeout``
(`trio_pg.KEEPALIVE_PARAMS`) so a dead server is noticed within seconds.

Cancelling a call mid-statement closes its connection at once (never waiting on the network) and
sends the server a cancel request from the pool's background nursery, so a cancelled ``pg_sleep``
stops on the server too; the pool opens a replacement on demand.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import attrs
import psycopg
import trio
from psycopg import sql as pgsql
from psycopg.types import TypeInfo

from agentd.store import errors, trio_pg

__all__ = [
    "DEFAULT_QUERY_TIMEOUT_S",
    "Database",
    "Params",
    "Query",
    "Transaction",
    "asyncio_loop",
    "open_database",
]

T = TypeVar("T")
Params = Sequence[Any] | Mapping[str, Any]
# Plain SQL text (what code outside the store passes) or a psycopg.sql composition (store modules).
Query = str | pgsql.Composable
Conn = trio_pg.TrioConnection

#: Client-side bound on every database call (waiting for a connection + the statement), seconds.
#: A few seconds below the agent's 10 s RPC timeout: a database that stops answering makes an RPC
#: fail with a clear "database unavailable" error before the agent gives up on its own.
DEFAULT_QUERY_TIMEOUT_S = 8.0

_ISOLATION_LEVELS = {
    "read committed": "READ COMMITTED",
    "repeatable read": "REPEATABLE READ",
    "serializable": "SERIALIZABLE",
}

# Cleanup after a failed transaction (ROLLBACK) must not hang on a dead server.
_CLEANUP_TIMEOUT_S = 2.0


def _sole_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for sub in exc.exceptions:
                walk(sub)
        else:
            leaves.append(exc)

    walk(group)
    return leaves[0] if len(leaves) == 1 else None


@asynccontextmanager
async def asyncio_loop() -> AsyncIterator[None]:
    """Kept for compatibility: the store no longer needs an asyncio loop (does nothing)."""
    yield


def describe_url(url: str) -> str:
    """The URL reduced to user@host:port/dbname (no password) for messages and logs."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<invalid database URL>"
    host = str(params.get("host") or "localhost")
    port = str(params.get("port") or "5432")
    user = str(params.get("user") or "")
    dbname = str(params.get("dbname") or "")
    return f"{user + '@' if user else ''}{host}:{port}/{dbname}"


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def translate_error(exc: BaseException) -> errors.StoreError:
    """Map a psycopg / pool exception onto the store's exception classes."""
    if isinstance(exc, errors.StoreError):
        return exc
    if isinstance(exc, trio_pg.PoolTimeout):
        return errors.DatabaseUnavailable(f"no database connection available: {_one_line(str(exc))}")
    if not isinstance(exc, psycopg.Error):
        return errors.StoreError(_one_line(str(exc)))
    sqlstate = exc.sqlstate
    constraint = exc.diag.constraint_name
    message = _one_line(exc.diag.message_primary or str(exc))
    kwargs: dict[str, Any] = {"sqlstate": sqlstate, "constraint": constraint}
    cls: type[errors.StoreError]
    if sqlstate == "23505":
        cls = errors.UniqueViolation
    elif sqlstate == "23503":
        cls = errors.ForeignKeyViolation
    elif sqlstate == "23514":
        cls = errors.CheckViolation
    elif sqlstate == "23502":
        cls = errors.NotNullViolation
    elif sqlstate is not None and sqlstate.startswith("23"):
        cls = errors.IntegrityError
    elif (sqlstate is not None and sqlstate.startswith("22")) or isinstance(exc, psycopg.DataError):
        cls = errors.DataError  # also psycopg's own refusals, e.g. a NUL character in a text value
    elif sqlstate in ("40001", "40P01"):
        cls = errors.SerializationFailure
    elif sqlstate == "57014":
        cls = errors.QueryCanceled
    elif (sqlstate is None and isinstance(exc, psycopg.OperationalError)) or (
        sqlstate is not None and sqlstate.startswith(("08", "57P"))
    ):
        cls = errors.DatabaseUnavailable
    else:
        cls = errors.StoreError
    return cls(message, **kwargs)


def _query(text: str | pgsql.Composable) -> Any:
    # psycopg's typing wants LiteralString; callers pass plain str per the store contract.
    return text


async def _execute(conn: Conn, text: str | pgsql.Composable, params: Params | None) -> int:
    cur = await conn.execute(_query(text), params)
    return cur.rowcount


async def _begun(conn: Conn, begin: str) -> Conn:
    await _execute(conn, begin, None)
    return conn


async def _fetchone(conn: Conn, text: str | pgsql.Composable, params: Params | None) -> Any:
    cur = await conn.execute(_query(text), params)
    return await cur.fetchone()


async def _fetchall(conn: Conn, text: str | pgsql.Composable, params: Params | None) -> Any:
    cur = await conn.execute(_query(text), params)
    return await cur.fetchall()


async def _copy(conn: Conn, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
    stmt = pgsql.SQL("COPY {} ({}) FROM STDIN").format(
        pgsql.Identifier(*table.split(".")), pgsql.SQL(", ").join(pgsql.Identifier(c) for c in columns)
    )
    n = 0
    async with conn.cursor() as cur, cur.copy(stmt) as copy:
        for row in rows:
            await copy.write_row(row)
            n += 1
    return n


_in_flight = 0
_busy_watcher: Callable[[bool], None] | None = None


def set_busy_watcher(watcher: Callable[[bool], None] | None) -> None:
    """Call ``watcher(True)`` when the first store call starts waiting on PostgreSQL and
    ``watcher(False)`` when the last one ends (LISTEN waits excluded); None removes it.

    Why: a socket wait looks idle to trio, so an autojumping test clock would skip virtual time
    (and fire deadlines, including the store's own ``query_timeout_s``) while a query is merely in
    flight; agentd.testing's clock uses this to hold still until PostgreSQL has answered.
    """
    global _busy_watcher
    _busy_watcher = watcher
    if watcher is not None and _in_flight:
        watcher(True)


def _busy() -> None:
    global _in_flight
    _in_flight += 1
    if _in_flight == 1 and _busy_watcher is not None:
        _busy_watcher(True)


def _idle() -> None:
    global _in_flight
    _in_flight -= 1
    if _in_flight == 0 and _busy_watcher is not None:
        _busy_watcher(False)


@attrs.define(eq=False)
class Transaction:
    """One pooled connection inside BEGIN … COMMIT; same query methods as `Database`."""

    _db: Database
    _conn: Conn

    async def execute(self, sql: Query, params: Params = ()) -> int:
        """Run a statement; return its rowcount."""
        return await self._db._run_on(self._conn, _execute, sql, params or None)

    async def fetchone(self, sql: Query, params: Params = ()) -> dict[str, Any] | None:
        """First row as a dict, or None."""
        return await self._db._run_on(self._conn, _fetchone, sql, params or None)

    async def fetchall(self, sql: Query, params: Params = ()) -> list[dict[str, Any]]:
        """All rows as dicts."""
        return await self._db._run_on(self._conn, _fetchall, sql, params or None)

    async def fetchval(self, sql: Query, params: Params = ()) -> Any:
        """First column of the first row, or None when there is no row."""
        row = await self.fetchone(sql, params)
        return None if row is None else next(iter(row.values()), None)

    async def copy_rows(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
        """COPY rows into table(columns) inside this transaction; returns the number of rows."""
        return await self._db._run_on(self._conn, _copy, table, columns, rows)


@attrs.define(eq=False)
class Database:
    """A pool of PostgreSQL connections seen from trio. Create it with `open_database`.

    Parameters use psycopg placeholders (``%s`` / ``%(name)s``; a literal ``%`` is ``%%``). With no
    parameters the text is sent as is: no placeholder processing, and several ``;``-separated
    statements are allowed (how `migrate` runs schema.sql). Statements outside `transaction`
    autocommit. Rows are dicts; enum values are their labels, enum arrays lists of labels.

    Every call must finish within ``query_timeout_s`` (None: unbounded) or fails with
    `errors.DatabaseUnavailable`; `with_query_timeout` gives a view with another bound.
    """

    _pool: trio_pg.TrioPool
    url: str
    statement_timeout_ms: int
    query_timeout_s: float | None = DEFAULT_QUERY_TIMEOUT_S

    @property
    def display_url(self) -> str:
        """The server address without credentials."""
        return describe_url(self.url)

    def with_query_timeout(self, seconds: float | None) -> Database:
        """The same pool with another client-side bound per call (e.g. longer for migrations)."""
        return attrs.evolve(self, query_timeout_s=seconds)

    def _deadline(self) -> float:
        t = self.query_timeout_s
        return math.inf if t is None else trio.current_time() + t

    def _timed_out(self, what: str) -> errors.DatabaseUnavailable:
        return errors.DatabaseUnavailable(
            f"PostgreSQL at {self.display_url} did not answer {what} within {self.query_timeout_s:g} s"
        )

    def _no_connection(self) -> errors.DatabaseUnavailable:
        """The call's deadline passed while every pooled connection was busy."""
        pool = self._pool
        return errors.DatabaseUnavailable(
            f"no database connection available within {self.query_timeout_s:g} s"
            f" ({pool.size} of {pool.max_size} in use)"
        )

    async def _run(
        self, fn: Callable[..., Awaitable[T]], *args: Any, _keep: bool = False, _what: str = "a query"
    ) -> T:
        """fn(conn, *args) on a pooled connection, within the call's deadline. ``_keep``: the
        connection stays with the caller (``fn`` returns it) unless ``fn`` failed."""
        _busy()
        pool = self._pool
        conn = None
        try:
            with trio.CancelScope(deadline=self._deadline()):
                conn = await pool.acquire()
                result = await fn(conn, *args)
                if _keep:
                    conn = None
                return result
            if conn is None:
                raise self._no_connection()
            raise self._timed_out(_what)
        except psycopg.Error as exc:
            raise translate_error(exc) from exc
        finally:
            if conn is not None:
                pool.release(conn)
            _idle()

    async def _begin(self, begin: str) -> Conn:
        """A pooled connection for the caller to keep, with ``begin`` run on it."""
        return await self._run(_begun, begin, _keep=True, _what="BEGIN")

    async def execute(self, sql: Query, params: Params = ()) -> int:
        """Run one statement in autocommit mode; return its rowcount."""
        return await self._run(_execute, sql, params or None)

    async def fetchone(self, sql: Query, params: Params = ()) -> dict[str, Any] | None:
        """First row as a dict, or None."""
        return await self._run(_fetchone, sql, params or None)

    async def fetchall(self, sql: Query, params: Params = ()) -> list[dict[str, Any]]:
        """All rows as dicts."""
        return await self._run(_fetchall, sql, params or None)

    async def fetchval(self, sql: Query, params: Params = ()) -> Any:
        """First column of the first row, or None when there is no row."""
        row = await self.fetchone(sql, params)
        return None if row is None else next(iter(row.values()), None)

    async def copy_rows(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
        """COPY rows into table(columns) in one round of the COPY protocol (hot bulk inserts)."""
        return await self._run(_copy, table, columns, rows)

    @asynccontextmanager
    async def transaction(self, isolation: str | None = None) -> AsyncIterator[Transaction]:
        """BEGIN on one pooled connection; COMMIT on normal exit, ROLLBACK on any exception.

        ``isolation`` is None (server default), "read committed", "repeatable read" or
        "serializable". Rollback is shielded from cancellation (and bounded); a connection that
        cannot roll back is closed. Each statement, BEGIN and COMMIT has its own deadline.
        """
        begin = "BEGIN"
        if isolation is not None:
            level = _ISOLATION_LEVELS.get(isolation.lower().replace("_", " "))
            if level is None:
                raise ValueError(f"unknown isolation level {isolation!r}")
            begin = f"BEGIN ISOLATION LEVEL {level}"
        conn = await self._begin(begin)
        try:
            tx = Transaction(self, conn)
            try:
                yield tx
            except BaseException:
                with trio.CancelScope(shield=True, deadline=trio.current_time() + _CLEANUP_TIMEOUT_S):
                    await _rollback_or_close(conn)
                raise
            await self._run_on(conn, _execute, "COMMIT", None)
        finally:
            self._pool.release(conn)

    async def reload_types(self) -> None:
        """Replace the pooled connections so they learn enum types created since they opened
        (called by `migrate` after changing the schema)."""
        self._pool.drain()
        await trio.lowlevel.checkpoint()

    async def _connect(self, *, autocommit: bool = True) -> Conn:
        """A dedicated connection outside the pool (the pubsub LISTEN connection)."""
        _busy()
        try:
            conn = await self._pool.connect()
        except psycopg.Error as exc:
            raise translate_error(exc) from exc
        finally:
            _idle()
        conn._autocommit = autocommit
        return conn

    async def _close_conn(self, conn: Conn) -> None:
        await conn.close()
        await trio.lowlevel.checkpoint()

    async def _run_on(self, conn: Conn, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """fn(conn, *args) on a connection the caller holds, within the call's deadline."""
        _busy()
        try:
            with trio.CancelScope(deadline=self._deadline()):
                return await fn(conn, *args)
            raise self._timed_out("a query")
        except psycopg.Error as exc:
            raise translate_error(exc) from exc
        finally:
            _idle()

    async def _wait_on(self, conn: Conn, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """_run_on for an open-ended wait (no deadline, not counted as a query in flight)."""
        try:
            return await fn(conn, *args)
        except psycopg.Error as exc:
            raise translate_error(exc) from exc


async def _rollback_or_close(conn: Conn) -> None:
    try:
        await conn.execute("ROLLBACK")
    except psycopg.Error:
        conn._interrupted()


async def _configure(conn: Conn, statement_timeout_ms: int) -> None:
    await conn.execute("SELECT set_config('statement_timeout', %s, false)", [f"{statement_timeout_ms}ms"])
    # Arrays of the schema's enums (subsystems, display_apps) should load as list[str], not as the
    # '{a,b}' text psycopg yields for array types it does not know.
    cur = await conn.execute(
        "SELECT typname, oid, typarray FROM pg_type"
        " WHERE typtype = 'e' AND typnamespace = 'public'::regnamespace"
    )
    for row in await cur.fetchall():
        TypeInfo(row["typname"], int(row["oid"]), int(row["typarray"])).register(conn)


@asynccontextmanager
async def open_database(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    statement_timeout_ms: int = 30_000,
    connect_timeout_s: float = 10.0,
    query_timeout_s: float | None = DEFAULT_QUERY_TIMEOUT_S,
) -> AsyncIterator[Database]:
    """Open a connection pool to ``url`` and close it on exit.

    An unreachable server raises `errors.DatabaseUnavailable` with a one-line message naming the
    server. ``query_timeout_s`` bounds every call (see `Database`). A single exception raised by the
    body propagates as itself, not wrapped in an ExceptionGroup.
    """
    try:
        conninfo = trio_pg.keepalive_conninfo(url, application_name="agentd")
    except psycopg.Error as exc:
        raise errors.DatabaseUnavailable(f"invalid database URL: {_one_line(str(exc))}") from exc

    async def configure(conn: Conn) -> None:
        await _configure(conn, statement_timeout_ms)

    pool = trio_pg.TrioPool(
        conninfo, configure, min_size=min_size, max_size=max_size, connect_timeout=connect_timeout_s
    )
    _busy()  # connecting is waiting on PostgreSQL too (see set_busy_watcher)
    try:
        await pool.open()
    except (psycopg.Error, trio.TooSlowError) as exc:
        store_exc = translate_error(exc)
        raise errors.DatabaseUnavailable(
            f"cannot connect to PostgreSQL at {describe_url(url)}: {store_exc}", sqlstate=store_exc.sqlstate
        ) from exc
    finally:
        _idle()
    try:
        async with trio.open_nursery() as nursery:
            pool.attach(nursery)
            try:
                yield Database(pool, url, statement_timeout_ms, query_timeout_s)
            finally:
                pool.close()
                pool.attach(None)
                # Cancel requests still in flight get a moment, then are abandoned.
                nursery.cancel_scope.deadline = min(nursery.cancel_scope.deadline, trio.current_time() + 1.0)
    except BaseExceptionGroup as group:
        sole = _sole_exception(group)
        if sole is None:
            raise
        raise sole from None
