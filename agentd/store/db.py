"""The trio-facing database handle: psycopg 3's async API driven through trio-asyncio.

Every query runs as a short asyncio coroutine on the trio-asyncio loop (``run_aio_coroutine``), so
the rest of agentd awaits plain trio functions and gets dict rows back. Cancelling the trio task
cancels the asyncio task; psycopg reacts to that by sending a cancel request to the server and
draining the connection before it goes back to the pool, so a cancelled ``pg_sleep`` stops on the
server too and the pooled connection stays usable.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar, cast

import attrs
import psycopg
import psycopg_pool
import trio
import trio_asyncio  # type: ignore[import-untyped]
from psycopg import sql as pgsql
from psycopg.rows import DictRow, dict_row
from psycopg.types import TypeInfo

from agentd.store import _aio, errors

assert _aio  # imported for its effect on psycopg

__all__ = ["Database", "Params", "Query", "Transaction", "asyncio_loop", "open_database"]

T = TypeVar("T")
Params = Sequence[Any] | Mapping[str, Any]
# Plain SQL text (what code outside the store passes) or a psycopg.sql composition (store modules).
Query = str | pgsql.Composable
Conn = psycopg.AsyncConnection[DictRow]
Pool = psycopg_pool.AsyncConnectionPool[Conn]

_ISOLATION_LEVELS = {
    "read committed": "READ COMMITTED",
    "repeatable read": "REPEATABLE READ",
    "serializable": "SERIALIZABLE",
}

# Cleanup after a cancelled or failed transaction must not hang forever on a dead server.
_CLEANUP_TIMEOUT_S = 10.0


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
async def _open_loop() -> AsyncIterator[Any]:
    # trio-asyncio runs the loop in a nursery, which wraps whatever the body raises in an
    # ExceptionGroup; callers of the store should see the one error itself.
    try:
        async with trio_asyncio.open_loop() as loop:
            yield loop
    except BaseExceptionGroup as group:
        sole = _sole_exception(group)
        if sole is None:
            raise
        raise sole from None


@asynccontextmanager
async def asyncio_loop() -> AsyncIterator[None]:
    """Open the process's trio-asyncio loop (once, at the daemon root); psycopg runs on it.

    Tasks started under it (and `open_database` called inside it) share this one loop. A single
    exception raised by the body propagates as itself, not wrapped in an ExceptionGroup.
    """
    async with _open_loop():
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
    if isinstance(exc, psycopg_pool.PoolTimeout):
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


async def _aio_execute(conn: Conn, text: str | pgsql.Composable, params: Params | None) -> int:
    cur = await conn.execute(_query(text), params)
    return cur.rowcount


async def _aio_fetchone(conn: Conn, text: str | pgsql.Composable, params: Params | None) -> DictRow | None:
    cur = await conn.execute(_query(text), params)
    return await cur.fetchone()


async def _aio_fetchall(conn: Conn, text: str | pgsql.Composable, params: Params | None) -> list[DictRow]:
    cur = await conn.execute(_query(text), params)
    return await cur.fetchall()


async def _aio_copy(conn: Conn, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
    stmt = pgsql.SQL("COPY {} ({}) FROM STDIN").format(
        pgsql.Identifier(*table.split(".")), pgsql.SQL(", ").join(pgsql.Identifier(c) for c in columns)
    )
    n = 0
    async with conn.cursor() as cur, cur.copy(stmt) as copy:
        for row in rows:
            await copy.write_row(row)
            n += 1
    return n


async def _with_pooled(pool: Pool, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    async with pool.connection() as conn:
        return await fn(conn, *args)


async def _rollback_or_close(conn: Conn) -> None:
    try:
        await conn.execute("ROLLBACK")
    except psycopg.Error:
        await conn.close()


_in_flight = 0
_busy_watcher: Callable[[bool], None] | None = None


def set_busy_watcher(watcher: Callable[[bool], None] | None) -> None:
    """Call ``watcher(True)`` when the first store call starts waiting on PostgreSQL and
    ``watcher(False)`` when the last one ends (LISTEN waits excluded); None removes it.

    Why: trio-asyncio's socket waits look idle to trio, so an autojumping test clock would skip
    virtual time (and fire deadlines) while a query is merely in flight; agentd.testing's clock uses
    this to hold still until PostgreSQL has answered.
    """
    global _busy_watcher
    _busy_watcher = watcher
    if watcher is not None and _in_flight:
        watcher(True)


@attrs.define(eq=False)
class _Runner:
    """Runs asyncio coroutines on the trio-asyncio loop and translates their errors."""

    loop: Any

    async def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        global _in_flight
        _in_flight += 1
        if _in_flight == 1 and _busy_watcher is not None:
            _busy_watcher(True)
        try:
            return await self.run_uncounted(fn, *args)
        finally:
            _in_flight -= 1
            if _in_flight == 0 and _busy_watcher is not None:
                _busy_watcher(False)

    async def run_uncounted(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Like run, for waits that may last forever by design (LISTEN for notifications)."""
        try:
            return cast(T, await self.loop.run_aio_coroutine(fn(*args)))
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise translate_error(exc) from exc


@attrs.define(eq=False)
class Transaction:
    """One pooled connection inside BEGIN … COMMIT; same query methods as `Database`."""

    _runner: _Runner
    _conn: Conn

    async def execute(self, sql: Query, params: Params = ()) -> int:
        """Run a statement; return its rowcount."""
        return await self._runner.run(_aio_execute, self._conn, sql, params or None)

    async def fetchone(self, sql: Query, params: Params = ()) -> dict[str, Any] | None:
        """First row as a dict, or None."""
        return await self._runner.run(_aio_fetchone, self._conn, sql, params or None)

    async def fetchall(self, sql: Query, params: Params = ()) -> list[dict[str, Any]]:
        """All rows as dicts."""
        return await self._runner.run(_aio_fetchall, self._conn, sql, params or None)

    async def fetchval(self, sql: Query, params: Params = ()) -> Any:
        """First column of the first row, or None when there is no row."""
        row = await self.fetchone(sql, params)
        return None if row is None else next(iter(row.values()), None)

    async def copy_rows(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
        """COPY rows into table(columns) inside this transaction; returns the number of rows."""
        return await self._runner.run(_aio_copy, self._conn, table, columns, rows)


@attrs.define(eq=False)
class Database:
    """A pool of PostgreSQL connections seen from trio. Create it with `open_database`.

    Parameters use psycopg placeholders (``%s`` / ``%(name)s``; a literal ``%`` is ``%%``). With no
    parameters the text is sent as is: no placeholder processing, and several ``;``-separated
    statements are allowed (how `migrate` runs schema.sql). Statements outside `transaction`
    autocommit. Rows are dicts; enum values are their labels, enum arrays lists of labels.
    """

    _runner: _Runner
    _pool: Pool
    url: str
    statement_timeout_ms: int

    @property
    def display_url(self) -> str:
        """The server address without credentials."""
        return describe_url(self.url)

    async def execute(self, sql: Query, params: Params = ()) -> int:
        """Run one statement in autocommit mode; return its rowcount."""
        return await self._runner.run(_with_pooled, self._pool, _aio_execute, sql, params or None)

    async def fetchone(self, sql: Query, params: Params = ()) -> dict[str, Any] | None:
        """First row as a dict, or None."""
        return await self._runner.run(_with_pooled, self._pool, _aio_fetchone, sql, params or None)

    async def fetchall(self, sql: Query, params: Params = ()) -> list[dict[str, Any]]:
        """All rows as dicts."""
        return await self._runner.run(_with_pooled, self._pool, _aio_fetchall, sql, params or None)

    async def fetchval(self, sql: Query, params: Params = ()) -> Any:
        """First column of the first row, or None when there is no row."""
        row = await self.fetchone(sql, params)
        return None if row is None else next(iter(row.values()), None)

    async def copy_rows(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
        """COPY rows into table(columns) in one round of the COPY protocol (hot bulk inserts)."""
        return await self._runner.run(_with_pooled, self._pool, _aio_copy, table, columns, rows)

    @asynccontextmanager
    async def transaction(self, isolation: str | None = None) -> AsyncIterator[Transaction]:
        """BEGIN on one pooled connection; COMMIT on normal exit, ROLLBACK on any exception.

        ``isolation`` is None (server default), "read committed", "repeatable read" or
        "serializable". Rollback and returning the connection are shielded from cancellation.
        """
        begin = "BEGIN"
        if isolation is not None:
            level = _ISOLATION_LEVELS.get(isolation.lower().replace("_", " "))
            if level is None:
                raise ValueError(f"unknown isolation level {isolation!r}")
            begin = f"BEGIN ISOLATION LEVEL {level}"
        conn: Conn = await self._runner.run(self._pool.getconn)
        try:
            await self._runner.run(_aio_execute, conn, begin, None)
            tx = Transaction(self._runner, conn)
            try:
                yield tx
            except BaseException:
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + _CLEANUP_TIMEOUT_S
                    await self._runner.run(_rollback_or_close, conn)
                raise
            await self._runner.run(_aio_execute, conn, "COMMIT", None)
        finally:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + _CLEANUP_TIMEOUT_S
                await self._runner.run(self._pool.putconn, conn)

    async def reload_types(self) -> None:
        """Replace the pooled connections so they learn enum types created since they opened
        (called by `migrate` after changing the schema)."""
        await self._runner.run(self._pool.drain)

    async def _connect(self, *, autocommit: bool = True) -> Conn:
        """A dedicated connection outside the pool (the pubsub LISTEN connection)."""
        return await self._runner.run(_aio_connect, self.url, self.statement_timeout_ms, autocommit)

    async def _close_conn(self, conn: Conn) -> None:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + _CLEANUP_TIMEOUT_S
            await self._runner.run(conn.close)

    async def _run_on(self, conn: Conn, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return await self._runner.run(fn, conn, *args)

    async def _wait_on(self, conn: Conn, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """_run_on for an open-ended wait (not counted as a query in flight)."""
        return await self._runner.run_uncounted(fn, conn, *args)


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


async def _aio_connect(url: str, statement_timeout_ms: int, autocommit: bool) -> Conn:
    conn = await psycopg.AsyncConnection.connect(
        url, autocommit=autocommit, row_factory=dict_row, application_name="agentd"
    )
    await _configure(conn, statement_timeout_ms)
    return conn


async def _aio_probe(url: str, connect_timeout_s: float) -> None:
    conn = await psycopg.AsyncConnection.connect(url, connect_timeout=max(1, round(connect_timeout_s)))
    await conn.close()


@asynccontextmanager
async def open_database(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    statement_timeout_ms: int = 30_000,
    connect_timeout_s: float = 10.0,
) -> AsyncIterator[Database]:
    """Open a connection pool to ``url`` and close it on exit.

    Needs a trio-asyncio loop: it uses the one opened by `asyncio_loop` in an enclosing task if
    there is one, else opens its own for its lifetime. An unreachable server raises
    `errors.DatabaseUnavailable` with a one-line message naming the server.
    """
    loop = trio_asyncio.current_loop.get()
    if loop is None:
        async with (
            _open_loop() as own_loop,
            _open_pool(own_loop, url, min_size, max_size, statement_timeout_ms, connect_timeout_s) as db,
        ):
            yield db
    else:
        async with _open_pool(loop, url, min_size, max_size, statement_timeout_ms, connect_timeout_s) as db:
            yield db


@asynccontextmanager
async def _open_pool(
    loop: Any, url: str, min_size: int, max_size: int, statement_timeout_ms: int, connect_timeout_s: float
) -> AsyncIterator[Database]:
    runner = _Runner(loop)
    try:
        await runner.run(_aio_probe, url, connect_timeout_s)
    except errors.StoreError as exc:
        raise errors.DatabaseUnavailable(
            f"cannot connect to PostgreSQL at {describe_url(url)}: {exc}", sqlstate=exc.sqlstate
        ) from exc

    async def configure(conn: Conn) -> None:
        await _configure(conn, statement_timeout_ms)

    def make_pool() -> Pool:
        return psycopg_pool.AsyncConnectionPool(
            url,
            connection_class=psycopg.AsyncConnection[DictRow],
            kwargs={"autocommit": True, "row_factory": dict_row, "application_name": "agentd"},
            min_size=min_size,
            max_size=max_size,
            configure=configure,
            open=False,
            name="agentd",
        )

    async def open_pool() -> Pool:
        # The pool must be created inside the loop (it grabs the running loop for its workers).
        pool = make_pool()
        await pool.open(wait=True, timeout=connect_timeout_s)
        return pool

    try:
        pool = await runner.run(open_pool)
    except errors.StoreError as exc:
        raise errors.DatabaseUnavailable(
            f"cannot open a connection pool to {describe_url(url)}: {exc}"
        ) from exc
    try:
        yield Database(runner, pool, url, statement_timeout_ms)
    finally:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + _CLEANUP_TIMEOUT_S
            await runner.run(pool.close)
