"""psycopg driven by trio itself: a connection whose socket waits are trio's, and a small pool.

psycopg keeps its protocol work in generators (``psycopg.generators``) that say which way they want
the socket ("wait until readable / writable") and are resumed once it is ready; its
`psycopg.AsyncConnection` hands every such generator to one method, ``wait``. `TrioConnection`
overrides that method with ``trio.lowlevel.wait_readable / wait_writable``, so psycopg's query
building, adaptation, row factories, COPY and type registry are used as they are, while no asyncio
loop (and no bridge between loops) is involved.

Interruption: psycopg's generators cannot be resumed after the waiting task is cancelled — the
connection would be left in the middle of the protocol. So a wait that does not finish marks its
connection lost: the socket is closed at once (a cancel never waits on a dead network), and when a
statement was running, a cancel request for that backend is sent from the pool's background nursery
(bounded by ``cancel_timeout``), so the statement stops on the server too. The pool replaces lost
connections on demand.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import math
import select
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs
import psycopg
import trio
from psycopg import errors as pg_errors
from psycopg import generators, pq
from psycopg.rows import DictRow, dict_row

__all__ = [
    "ConnectionLost",
    "PoolClosed",
    "PoolTimeout",
    "TrioConnection",
    "TrioPool",
    "connect",
    "keepalive_conninfo",
    "wait_notifies",
]

log = logging.getLogger("agentd.store")

RV = TypeVar("RV")

_WAIT_R = psycopg.waiting.WAIT_R
_WAIT_W = psycopg.waiting.WAIT_W
_READY_R = psycopg.waiting.READY_R
_READY_W = psycopg.waiting.READY_W
_READY_RW = psycopg.waiting.READY_RW
_ACTIVE = pq.TransactionStatus.ACTIVE
_IDLE = pq.TransactionStatus.IDLE
_OK = pq.ConnStatus.OK

#: TCP settings that let a dead peer (or a network that drops packets) be noticed in seconds:
#: probes after 5 s idle, every 2 s, 3 lost probes close the socket; unacknowledged data (a query
#: sent into a black hole) fails after 5 s. libpq ignores them on Unix sockets. Values the URL sets
#: itself win.
KEEPALIVE_PARAMS: dict[str, str] = {
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
    "tcp_user_timeout": "5000",
}


class ConnectionLost(psycopg.OperationalError):
    """The connection was closed because a wait on it was interrupted (cancelled mid-protocol)."""


class PoolTimeout(psycopg.OperationalError):
    """No pooled connection became available within the wait bound."""


class PoolClosed(psycopg.OperationalError):
    """The pool is closed."""


def keepalive_conninfo(url: str, **extra: Any) -> str:
    """``url`` as a conninfo string with `KEEPALIVE_PARAMS` (unless set) and ``extra`` added."""
    params = psycopg.conninfo.conninfo_to_dict(url)
    for key, value in KEEPALIVE_PARAMS.items():
        params.setdefault(key, value)
    params.update(extra)
    return psycopg.conninfo.make_conninfo("", **params)


class _Lock:
    """psycopg's per-connection lock without asyncio and without a checkpoint when free (the pool
    hands a connection to one task at a time, so it is nearly always free)."""

    __slots__ = ("_held", "_lot")

    def __init__(self) -> None:
        self._held = False
        self._lot = trio.lowlevel.ParkingLot()

    async def __aenter__(self) -> None:
        while self._held:
            await self._lot.park()
        self._held = True

    async def __aexit__(self, *exc: object) -> None:
        self._held = False
        if self._lot:
            self._lot.unpark()


Spawner = Callable[[Callable[[], Awaitable[None]]], None]


class TrioConnection(psycopg.AsyncConnection[DictRow]):
    """A psycopg AsyncConnection whose socket waits are trio's. Create it with `connect`."""

    _spawn: Spawner | None = None
    #: Set once a wait was interrupted: the connection was closed and must not be reused.
    lost: bool = False

    def __init__(self, pgconn: Any) -> None:
        super().__init__(pgconn, row_factory=dict_row)
        self.lock = _Lock()  # type: ignore[assignment]

    async def wait(
        self,
        gen: Any,
        interval: float | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - psycopg's signature
    ) -> Any:
        if self.lost or self.pgconn.status != _OK:
            gen.close()
            # psycopg's own cleanup (closing a COPY, a cursor) may land here while the task is
            # being cancelled: let the Cancelled through rather than replace it with this error.
            await trio.lowlevel.checkpoint_if_cancelled()
            raise ConnectionLost("the connection is closed")
        try:
            if timeout is None:
                return await _drive(gen, self.pgconn.socket)
            with trio.move_on_after(timeout):
                return await _drive(gen, self.pgconn.socket)
            self._interrupted()  # the generator was cut mid-way
            raise pg_errors._WaitTimeout()
        except psycopg.Error:
            # psycopg refusing a parameter before sending it (a NUL in a text value) leaves the
            # connection in step with the server; a failed socket or a statement cut off does not.
            if self.pgconn.status != _OK or self.pgconn.transaction_status == _ACTIVE:
                self._interrupted()
            raise
        except BaseException:
            self._interrupted()
            raise

    def _interrupted(self) -> None:
        """Close the connection now; if a statement was running, cancel it on the server."""
        if self.lost:
            return
        self.lost = True
        cancel_conn = None
        if self.pgconn.status == _OK and self.pgconn.transaction_status == _ACTIVE:
            try:
                cancel_conn = self.pgconn.cancel_conn()
            except psycopg.Error:
                cancel_conn = None
        self._closed = True
        self.pgconn.finish()
        if cancel_conn is not None and self._spawn is not None:
            spawned = cancel_conn

            async def cancel() -> None:
                await _send_cancel(spawned)

            self._spawn(cancel)


async def _drive(gen: Any, fileno: int) -> Any:
    """Run a psycopg PQGen (yields WAIT_R/W/RW, receives READY_*) on ``fileno`` with trio waits."""
    try:
        state = next(gen)
        while True:
            if state == _WAIT_R:
                await trio.lowlevel.wait_readable(fileno)
                state = gen.send(_READY_R)
            elif state == _WAIT_W:
                await trio.lowlevel.wait_writable(fileno)
                state = gen.send(_READY_W)
            else:
                state = gen.send(await _wait_rw(fileno))
    except StopIteration as stop:
        return stop.value
    except OSError as exc:
        raise psycopg.OperationalError(f"connection socket failed: {exc}") from exc


async def _wait_rw(fileno: int) -> Any:
    """Wait until the socket is readable or writable (a large send while the server talks back)."""
    readable, writable, _ = select.select((fileno,), (fileno,), (), 0)
    if readable or writable:
        await trio.lowlevel.checkpoint()
        return (_READY_R if readable else 0) | (_READY_W if writable else 0)
    ready = 0
    try:
        async with trio.open_nursery() as nursery:

            async def one(waiter: Callable[[int], Awaitable[None]], flag: Any) -> None:
                nonlocal ready
                await waiter(fileno)
                ready |= flag
                nursery.cancel_scope.cancel()

            nursery.start_soon(one, trio.lowlevel.wait_readable, _READY_R)
            nursery.start_soon(one, trio.lowlevel.wait_writable, _READY_W)
    except BaseExceptionGroup as group:
        # Cancelled from outside: both waiters raise Cancelled. Callers (batchers keeping their rows
        # on `except trio.Cancelled`) must see a plain Cancelled, not a group of two.
        _, rest = group.split(trio.Cancelled)
        if rest is None:
            raise group.exceptions[0] from None
        raise
    return ready


async def _drive_conn(gen: Any) -> Any:
    """Run a psycopg PQGenConn (yields ``(fileno, WAIT_*)``; the socket may change while
    connecting) with trio waits."""
    try:
        fileno, state = next(gen)
        while True:
            if state == _WAIT_R:
                await trio.lowlevel.wait_readable(fileno)
                fileno, state = gen.send(_READY_R)
            elif state == _WAIT_W:
                await trio.lowlevel.wait_writable(fileno)
                fileno, state = gen.send(_READY_W)
            else:
                fileno, state = gen.send(await _wait_rw(fileno))
    except StopIteration as stop:
        return stop.value
    except OSError as exc:
        raise psycopg.OperationalError(f"connection socket failed: {exc}") from exc


async def _resolve(params: dict[str, Any]) -> dict[str, Any]:
    """Resolve a single host name with trio (libpq would block the whole process on DNS)."""
    host = str(params.get("host") or "")
    if not host or params.get("hostaddr") or "," in host or host.startswith("/") or host.startswith("@"):
        return params
    try:
        ipaddress.ip_address(host)
        return params
    except ValueError:
        pass
    port = int(str(params.get("port") or "5432").split(",")[0])
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    except OSError as exc:
        raise psycopg.OperationalError(f'could not translate host name "{host}": {exc}') from exc
    if not infos:
        raise psycopg.OperationalError(f'could not translate host name "{host}"')
    return {**params, "hostaddr": infos[0][4][0]}


async def connect(
    conninfo: str,
    *,
    timeout: float = 10.0,  # noqa: ASYNC109
    spawn: Spawner | None = None,
) -> TrioConnection:
    """Open an autocommit `TrioConnection` (dict rows) within ``timeout`` seconds.

    ``spawn`` starts background work of the connection (the cancel request after an interrupted
    statement) in its owner's nursery; without it an interrupted statement is only disconnected.
    """
    params = await _resolve(psycopg.conninfo.conninfo_to_dict(conninfo))
    pgconn = None
    with trio.move_on_after(timeout) as scope:
        gen = generators.connect(psycopg.conninfo.make_conninfo("", **params))
        pgconn = await _drive_conn(gen)
    if scope.cancelled_caught or pgconn is None:
        raise psycopg.OperationalError(f"connection timeout expired after {timeout:g} s")
    conn = TrioConnection(pgconn)
    conn._spawn = spawn
    conn._autocommit = True
    return conn


async def _send_cancel(cancel_conn: Any, timeout: float = 5.0) -> None:  # noqa: ASYNC109
    """Ask the server to cancel the statement of ``cancel_conn``'s backend (libpq's non-blocking
    cancel request on a new socket), within ``timeout`` seconds; failures are logged only."""
    try:
        with trio.move_on_after(timeout) as scope:
            cancel_conn.start()
            await _drive_conn(generators.cancel(cancel_conn))
        if scope.cancelled_caught:
            log.warning("cancel request for an interrupted statement got no answer within %g s", timeout)
    except psycopg.Error as exc:
        log.warning("cancel request for an interrupted statement failed: %s", exc)
    finally:
        cancel_conn.finish()


async def wait_notifies(conn: TrioConnection) -> list[psycopg.Notify]:
    """Wait until the server sends something on a LISTENing connection; return the notifications
    received (possibly none). Cancelling this wait leaves the connection usable."""
    pgconn = conn.pgconn
    if conn.lost or pgconn.status != _OK:
        raise ConnectionLost("the connection is closed")
    try:
        await trio.lowlevel.wait_readable(pgconn.socket)
        pgconn.consume_input()
    except (OSError, psycopg.OperationalError) as exc:
        conn._interrupted()
        raise psycopg.OperationalError(f"lost the LISTEN connection: {exc}") from exc
    if pgconn.status != _OK:
        conn._interrupted()
        raise psycopg.OperationalError("lost the LISTEN connection")
    enc = pgconn._encoding
    notes: list[psycopg.Notify] = []
    while (n := pgconn.notifies()) is not None:
        notes.append(psycopg.Notify(n.relname.decode(enc), n.extra.decode(enc), n.be_pid))
    return notes


def _idle_usable(conn: TrioConnection) -> bool:
    """An idle pooled connection still looks healthy (cheap: one poll, no round trip). A pooled
    connection neither LISTENs nor SETs, so anything the server sends while it is idle is the FATAL
    message before a shutdown or termination, or EOF: such a connection is not reused."""
    if conn.lost or conn.closed:
        return False
    pgconn = conn.pgconn
    if pgconn.status != _OK or pgconn.transaction_status != _IDLE:
        return False
    try:
        readable, _, _ = select.select((pgconn.socket,), (), (), 0)
    except (OSError, ValueError):
        return False
    return not readable


@attrs.define(eq=False)
class _Waiter:
    event: trio.Event = attrs.field(factory=trio.Event)
    conn: TrioConnection | None = None
    #: Granted a slot to open a new connection (instead of a pooled one).
    slot: bool = False


@attrs.define(eq=False)
class TrioPool:
    """At most ``max_size`` `TrioConnection`s to one server, ``min_size`` opened up front.

    `acquire` hands out an idle connection, opens a new one while under ``max_size``, else waits (in
    arrival order) at most ``timeout`` seconds, then raises `PoolTimeout`. `release` takes it back;
    a connection that was lost, closed or left in a transaction is closed and its slot freed.
    ``configure`` runs on every new connection. `open` it, `attach` a nursery for its background
    work, `close` it when done.
    """

    conninfo: str
    configure: Callable[[TrioConnection], Awaitable[None]]
    min_size: int = 1
    max_size: int = 10
    connect_timeout: float = 10.0
    _idle: collections.deque[TrioConnection] = attrs.field(factory=collections.deque, init=False)
    _waiters: collections.deque[_Waiter] = attrs.field(factory=collections.deque, init=False)
    #: Open connections plus those being opened.
    _size: int = attrs.field(default=0, init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    _generation: int = attrs.field(default=0, init=False)
    _born: dict[int, int] = attrs.field(factory=dict, init=False)

    @property
    def size(self) -> int:
        """Open connections (in use or idle) plus those being opened."""
        return self._size

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def open(self) -> None:
        """Open ``min_size`` connections; the first failure propagates (and closes the others)."""
        opened: list[TrioConnection] = []
        try:
            for _ in range(self.min_size):
                self._size += 1
                try:
                    opened.append(await self._open())
                except BaseException:
                    self._size -= 1
                    raise
        except BaseException:
            for conn in opened:
                self._discard(conn)
                self._size -= 1
            raise
        for conn in opened:
            self.release(conn)

    def attach(self, nursery: trio.Nursery | None) -> None:
        """Where background work (cancel requests for interrupted statements) runs; None detaches."""
        self._nursery = nursery

    def close(self) -> None:
        """Close idle connections; connections in use close when released; waiters fail."""
        self._closed = True
        while self._idle:
            self._discard(self._idle.popleft())
        while self._waiters:
            self._waiters.popleft().event.set()

    def spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn`` in the pool's background nursery (dropped when the pool is not running)."""
        if self._nursery is not None and not self._closed:
            self._nursery.start_soon(fn)

    async def connect(self) -> TrioConnection:
        """A new configured connection outside the pool's accounting (e.g. for LISTEN)."""
        conn = await connect(self.conninfo, timeout=self.connect_timeout, spawn=self.spawn)
        try:
            with trio.fail_after(self.connect_timeout):
                await self.configure(conn)
        except BaseException:
            conn._interrupted()
            raise
        return conn

    async def _open(self) -> TrioConnection:
        try:
            with trio.fail_after(self.connect_timeout):
                conn = await self.connect()
        except trio.TooSlowError:
            raise psycopg.OperationalError(
                f"connection timeout expired after {self.connect_timeout:g} s"
            ) from None
        self._born[id(conn)] = self._generation
        return conn

    async def acquire(self, timeout: float = math.inf) -> TrioConnection:  # noqa: ASYNC109
        """A connection for the caller alone; give it back with `release`."""
        while True:
            if self._closed:
                raise PoolClosed("the connection pool is closed")
            while self._idle:
                conn = self._idle.pop()
                if _idle_usable(conn):
                    return conn
                self._discard(conn)
                self._size -= 1
            if self._size < self.max_size:
                self._size += 1
                return await self._open_for_caller()
            waiter = _Waiter()
            self._waiters.append(waiter)
            try:
                with trio.move_on_after(timeout):
                    await waiter.event.wait()
            except BaseException:
                self._abandon(waiter)
                raise
            if waiter.conn is not None:
                return waiter.conn
            if waiter.slot:
                return await self._open_for_caller()
            if not waiter.event.is_set():
                self._abandon(waiter)
                raise PoolTimeout(
                    f"no connection free within {timeout:g} s ({self._size} of {self.max_size} in use)"
                )
            # Woken by close(): loop to raise PoolClosed.

    async def _open_for_caller(self) -> TrioConnection:
        try:
            return await self._open()
        except BaseException:
            self._size -= 1
            self._wake_for_slot()
            raise

    def _abandon(self, waiter: _Waiter) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass
        if waiter.conn is not None:
            conn, waiter.conn = waiter.conn, None
            self.release(conn)
        elif waiter.slot:
            waiter.slot = False
            self._size -= 1
            self._wake_for_slot()

    def release(self, conn: TrioConnection) -> None:
        """Give back a connection from `acquire` (not a checkpoint; never blocks)."""
        if (
            self._closed
            or conn.lost
            or conn.closed
            or conn.pgconn.status != _OK
            or conn.pgconn.transaction_status != _IDLE
            or self._born.get(id(conn)) != self._generation
        ):
            self._discard(conn)
            self._size -= 1
            self._wake_for_slot()
            return
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.conn = conn
            waiter.event.set()
            return
        self._idle.append(conn)

    def _wake_for_slot(self) -> None:
        if self._waiters and self._size < self.max_size and not self._closed:
            waiter = self._waiters.popleft()
            waiter.slot = True
            self._size += 1
            waiter.event.set()

    def _discard(self, conn: TrioConnection) -> None:
        self._born.pop(id(conn), None)
        if not conn.closed:
            conn._closed = True
            conn.pgconn.finish()

    def drain(self) -> None:
        """Replace every connection: idle ones close now, those in use when released."""
        self._generation += 1
        while self._idle:
            self._discard(self._idle.popleft())
            self._size -= 1
        while self._waiters and self._size < self.max_size:
            self._wake_for_slot()
