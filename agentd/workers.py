"""`agentd serve --workers N`: a small parent process supervising N worker processes on one host.

One Python process uses one core. With ``workers = N`` (N > 1) `agentd serve` becomes a parent that

* binds the agent listeners once (or takes systemd's socket-activated ones): a Unix socket is bound
  by the parent and its descriptor inherited by every worker (the kernel hands each connection to
  whichever worker accepts first); a TCP address is checked and reserved by the parent with
  SO_REUSEPORT, and every worker binds and listens on a socket of its own on the same address, so
  the kernel spreads connections over the workers' sockets, and a dead worker's socket (and its
  backlog) disappears with it instead of collecting connections nobody accepts. Sockets systemd
  passes are shared like the Unix socket;
* starts the embedded PostgreSQL when no `postgres_url` is configured and hands every worker its URL;
* starts the workers — each is today's daemon (`agentd.daemon.Daemon`: own trio run, own replica
  id, own pool) run by the same `agentd serve` command line with ``AGENTD_WORKER`` in its
  environment. Worker 0 starts (and migrates the schema) first; the others start once it is ready,
  so a configuration or database problem is reported once, by one process;
* supervises: a worker that dies is logged and restarted after a jittered exponential backoff
  (0.5 s doubling to 30 s, reset after 60 s of running); a worker whose watchdog pings stop for
  `WORKER_HANG_TIMEOUT` is killed and restarted. SIGTERM/SIGINT are forwarded to every worker and
  the parent waits for their graceful stops (`shutdown_timeout` + `STOP_MARGIN`, then SIGKILL);
  SIGHUP is forwarded to every worker. Workers speak sd_notify to the parent (a private datagram
  socket each); the parent tells systemd READY=1 once every worker is ready, WATCHDOG=1 only while
  every worker is alive and pinging, STOPPING=1 when it stops;
* serves `metrics_listen` itself: ``/metrics`` is the sum over the workers (each serves its own
  exposition on a private Unix socket in the parent's runtime directory): agentd's counters and
  histograms are added up; an agent-reported series appears once, with the value of the worker that
  heard from the agent last (an agent that moved to another worker leaves a stale copy behind until
  it expires); ``agentd_worker_up`` and ``agentd_worker_restarts_total`` describe the workers.
  ``/healthz`` lists every worker.

Workers watch a pipe from the parent and stop when it closes, so a parent killed with SIGKILL does
not leave workers serving on their own. Workers run in a process group of their own, so a terminal's
Ctrl-C reaches only the parent, which forwards one SIGTERM (a second Ctrl-C forwards a second one:
cancel open connections now).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Any

import attrs
import trio
from prometheus_client import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from trio_util import AsyncValue, periodic  # type: ignore[import-untyped]

from agentd import __version__, systemd
from agentd.agent.backoff import Backoff
from agentd.config import Config, ListenAddress, TcpAddress, UnixAddress, reread_config
from agentd.http import HttpApp, Request, Router
from agentd.listeners import (
    BACKLOG,
    BoundListener,
    ListenError,
    Server,
    adopt_socket,
    bind_all,
    bind_unix,
    describe_bind_error,
)
from agentd.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from agentd.metrics import Families, exposition, private_registry

log = logging.getLogger("agentd.workers")

#: The environment variable that makes `agentd serve` a worker: JSON of `WorkerSpec`.
WORKER_ENV = "AGENTD_WORKER"
#: Beyond `shutdown_timeout`: time for a worker to flush its batchers and close its pool.
STOP_MARGIN = 10.0
#: Workers ping the parent this often (sd_notify WATCHDOG=1 to the parent's socket).
WORKER_WATCHDOG_INTERVAL = 1.0
#: A ready worker silent for this long is hung: killed and restarted.
WORKER_HANG_TIMEOUT = 30.0
#: Restart backoff: floor, ceiling, and the run time after which a worker counts as healthy again.
RESTART_FLOOR = 0.5
RESTART_CEILING = 30.0
RESTART_RESET_AFTER = 60.0
#: How long the parent waits for a worker's private /metrics or /healthz answer.
FETCH_TIMEOUT = 5.0


# --------------------------------------------------------------------------------------------------
# The worker side


@attrs.frozen
class WorkerSpec:
    """What the parent tells a worker (JSON in $AGENTD_WORKER)."""

    index: int
    #: Listening sockets shared by every worker: (fd, name to log).
    shared_fds: tuple[tuple[int, str], ...]
    #: TCP addresses every worker binds with SO_REUSEPORT: (family, host, port).
    reuseport: tuple[tuple[int, str, int], ...]
    #: The worker's private operator socket (/metrics, /healthz for the parent).
    operator_socket: str
    postgres_url: str | None
    #: Read end of a pipe whose write end only the parent holds: EOF = the parent is gone.
    parent_fd: int

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        raw = json.loads(text)
        return cls(
            index=int(raw["index"]),
            shared_fds=tuple((int(fd), str(name)) for fd, name in raw["shared_fds"]),
            reuseport=tuple((int(f), str(h), int(p)) for f, h, p in raw["reuseport"]),
            operator_socket=str(raw["operator_socket"]),
            postgres_url=raw["postgres_url"],
            parent_fd=int(raw["parent_fd"]),
        )


def worker_spec_from_environ(environ: Mapping[str, str] | None = None) -> WorkerSpec | None:
    env = os.environ if environ is None else environ
    text = env.get(WORKER_ENV)
    return None if not text else WorkerSpec.from_json(text)


def worker_config(config: Config, spec: WorkerSpec) -> Config:
    """The worker's view of the configuration: the parent's database, a private operator socket."""
    return attrs.evolve(
        config,
        postgres_url=spec.postgres_url if spec.postgres_url is not None else config.postgres_url,
        metrics_listen=UnixAddress(Path(spec.operator_socket)),
    )


def reuseport_socket(family: int, host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEADDR and SO_REUSEPORT, not yet listening."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _listener(sock: socket.socket, name: str) -> BoundListener:
    sock.setblocking(False)
    return BoundListener(trio.SocketListener(trio.socket.from_stdlib_socket(sock)), name)


async def bind_worker_listeners(spec: WorkerSpec) -> list[BoundListener]:
    """The worker's agent listeners: the shared descriptors plus its own SO_REUSEPORT sockets."""
    bound: list[BoundListener] = []
    try:
        for fd, name in spec.shared_fds:
            bound.append(_listener(socket.socket(fileno=fd), name))
        for family, host, port in spec.reuseport:
            sock = reuseport_socket(family, host, port)
            sock.listen(BACKLOG)
            bound.append(_listener(sock, str(TcpAddress(host, port))))
    except OSError as e:
        with trio.CancelScope(shield=True):
            for listener in bound:
                await listener.aclose()
        raise ListenError(f"worker {spec.index}: cannot listen: {e.strerror or e}") from None
    return bound


async def run_worker(spec: WorkerSpec, config: Config, reload_config: Callable[[], Config]) -> None:
    """One worker: today's daemon on the parent's listeners, stopped when the parent goes away."""
    from agentd.daemon import Daemon

    daemon = Daemon(
        worker_config(config, spec),
        reload_config=lambda: worker_config(reload_config(), spec),
        freeze_gc_when_ready=True,
        exit_on_overrun=True,
        bind_listeners=lambda: bind_worker_listeners(spec),
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_parent, spec.parent_fd, daemon.request_stop)
        await daemon.run()
        nursery.cancel_scope.cancel()


async def _watch_parent(fd: int, stop: Callable[[], None]) -> None:
    async with trio.lowlevel.FdStream(fd) as pipe:
        while await pipe.receive_some(64):
            pass
    log.warning("the parent process is gone; stopping")
    stop()


# --------------------------------------------------------------------------------------------------
# The parent side


@attrs.define(eq=False)
class Worker:
    """One worker slot: the process currently filling it and what its sd_notify messages said."""

    index: int
    notify_path: Path
    operator_socket: Path
    process: trio.Process | None = None
    ready: bool = False
    ever_ready: trio.Event = attrs.field(factory=trio.Event)
    #: READY=1 notifications so far: `reload` waits for the count to pass the one at its SIGHUP
    readies: AsyncValue = attrs.field(factory=lambda: AsyncValue(0))
    last_ping: float = -math.inf
    restarts: int = 0
    exited: trio.Event = attrs.field(factory=trio.Event)
    last_status: int | None = None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def signal(self, signum: int) -> None:
        if self.alive:
            assert self.process is not None
            try:
                self.process.send_signal(signum)
            except ProcessLookupError:
                pass


def _describe_status(status: int) -> str:
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


@attrs.define(eq=False)
class ParentListeners:
    """What the parent bound: shared descriptors (unix, systemd) and reserved SO_REUSEPORT ports."""

    shared: list[BoundListener] = attrs.field(factory=list)
    reserved: list[tuple[socket.socket, tuple[int, str, int]]] = attrs.field(factory=list)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.shared] + [str(TcpAddress(h, p)) for _, (_f, h, p) in self.reserved]

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for bound in self.shared:
                await bound.aclose()
        for sock, _ in self.reserved:
            sock.close()
        self.shared.clear()
        self.reserved.clear()


def reserve_tcp(address: TcpAddress) -> list[tuple[socket.socket, tuple[int, str, int]]]:
    """Check that nobody uses `address` (a plain bind, so another agentd's SO_REUSEPORT sockets count
    too), then keep it with a bound, non-listening SO_REUSEPORT socket per resolved address. Port 0
    is resolved once: every worker binds the same port."""
    try:
        infos = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as e:
        raise ListenError(f"cannot listen on {address}: {e.strerror}") from None
    reserved: list[tuple[socket.socket, tuple[int, str, int]]] = []
    port = address.port
    seen: set[tuple[int, str]] = set()
    try:
        for family, _type, _proto, _canon, sockaddr in infos:
            host = str(sockaddr[0])
            if (family, host) in seen:
                continue
            seen.add((family, host))
            probe = socket.socket(family, socket.SOCK_STREAM)
            try:
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
                port = probe.getsockname()[1]
            finally:
                probe.close()
            reserved.append((reuseport_socket(family, host, port), (int(family), host, port)))
    except OSError as e:
        for sock, _ in reserved:
            sock.close()
        raise ListenError(f"cannot listen on {address}: {describe_bind_error(e)}") from None
    return reserved


async def bind_parent_listeners(
    addresses: Iterable[ListenAddress], inherited: Iterable[socket.socket]
) -> ParentListeners:
    out = ParentListeners()
    try:
        for sock in inherited:
            out.shared.append(adopt_socket(sock))
        for address in addresses:
            if isinstance(address, UnixAddress):
                out.shared.append(await bind_unix(address))
            else:
                out.reserved.extend(reserve_tcp(address))
    except BaseException:
        await out.aclose()
        raise
    return out


@contextmanager
def _runtime_dir() -> Iterator[Path]:
    """A private directory (0700) for the workers' notify and operator sockets."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base or not os.path.isdir(base) or not os.access(base, os.W_OK):
        base = None
    path = Path(tempfile.mkdtemp(prefix="agentd-workers-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@attrs.define(eq=False)
class Supervisor:
    """The parent process of `agentd serve --workers N`; `run` returns the exit status."""

    config: Config
    #: The command line that starts a worker (`agentd serve` with the same flags).
    worker_command: Sequence[str]
    reload_config: Callable[[], Config] | None = None
    notifier: systemd.Notifier = attrs.field(factory=systemd.Notifier.from_environ)
    workers: list[Worker] = attrs.field(factory=list, init=False)
    _stopping: bool = attrs.field(default=False, init=False)
    _stop: trio.Event = attrs.field(factory=trio.Event, init=False)
    _signals_forwarded: int = attrs.field(default=0, init=False)
    _startup_failed: int | None = attrs.field(default=None, init=False)

    # ---- running

    async def run(self) -> int:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_signals, signals)
                try:
                    status = await self._run()
                finally:
                    nursery.cancel_scope.cancel()
                    self.notifier.close()
        if status == 0:
            log.info("stopped")
        return status

    async def _run(self) -> int:
        from agentd.daemon import database_url

        inherited = systemd.listen_fds()
        addresses = self.config.listen_addresses(socket_activated=bool(inherited))
        async with AsyncExitStack() as stack:
            listeners = await bind_parent_listeners(addresses, inherited)
            stack.push_async_callback(listeners.aclose)
            operator: list[BoundListener] = []
            if self.config.metrics_listen is not None:
                operator = await bind_all([self.config.metrics_listen])
            for bound in operator:
                stack.push_async_callback(bound.aclose)
            runtime = stack.enter_context(_runtime_dir())
            if self.config.postgres_url is None:
                log.info("starting embedded PostgreSQL in %s", self.config.data_dir)
            url = await stack.enter_async_context(database_url(self.config))
            self.workers = [
                Worker(i, runtime / f"notify-{i}", runtime / f"operator-{i}.sock")
                for i in range(self.config.workers)
            ]
            return await self._supervise_all(listeners, operator, url)
        raise AssertionError("unreachable")  # pragma: no cover (mypy: AsyncExitStack may swallow)

    async def _supervise_all(
        self, listeners: ParentListeners, operator: list[BoundListener], url: str
    ) -> int:
        async with trio.open_nursery() as nursery:
            for worker in self.workers:
                await nursery.start(self._receive_notifications, worker)
            server = Server(operator, HttpApp(self._operator_router()).handle_connection)
            await nursery.start(server.run)
            # Worker 0 first: it migrates the schema, and a broken configuration fails once.
            first = self.workers[0]
            nursery.start_soon(self._supervise, first, listeners, url)
            await self._wait_ready_or_stop([first])
            if self._startup_failed is None and not self._stop.is_set():
                for worker in self.workers[1:]:
                    nursery.start_soon(self._supervise, worker, listeners, url)
                await self._wait_ready_or_stop(self.workers)
            if self._startup_failed is not None or self._stop.is_set():
                await self._stop_workers()
                server.stop(0)
                nursery.cancel_scope.cancel()
                return self._startup_failed or 0
            for bound in operator:
                log.info("serving /metrics on %s", bound.name)
            for name in listeners.names:
                log.info("listening on %s (%d workers)", name, len(self.workers))
            pids = ", ".join(str(w.pid) for w in self.workers)
            await self.notifier.notify(
                "READY=1",
                f"STATUS=serving on {', '.join(listeners.names)} with {len(self.workers)} workers",
            )
            log.info("agentd %s ready: %d workers (pids %s)", __version__, len(self.workers), pids)
            nursery.start_soon(self._watchdog, systemd.watchdog_interval())
            await self._stop.wait()
            await self.notifier.notify("STOPPING=1", "STATUS=shutting down")
            await self._stop_workers()
            server.stop(0)
            nursery.cancel_scope.cancel()
        return 0

    async def _wait_ready_or_stop(self, workers: list[Worker]) -> None:
        async with trio.open_nursery() as nursery:

            async def wait_all() -> None:
                for worker in workers:
                    await worker.ever_ready.wait()
                nursery.cancel_scope.cancel()

            async def wait_stop() -> None:
                await self._stop.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait_all)
            nursery.start_soon(wait_stop)

    def _spawn_env(
        self, worker: Worker, listeners: ParentListeners, url: str, parent_fd: int
    ) -> dict[str, str]:
        env = dict(os.environ)
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_PID", "NOTIFY_SOCKET"):
            env.pop(key, None)
        spec = WorkerSpec(
            index=worker.index,
            shared_fds=tuple((b.listener.socket.fileno(), b.name) for b in listeners.shared),
            reuseport=tuple(info for _, info in listeners.reserved),
            operator_socket=str(worker.operator_socket),
            postgres_url=url,
            parent_fd=parent_fd,
        )
        env[WORKER_ENV] = spec.to_json()
        env["NOTIFY_SOCKET"] = str(worker.notify_path)
        env["WATCHDOG_USEC"] = str(int(WORKER_WATCHDOG_INTERVAL * 2_000_000))
        return env

    async def _supervise(self, worker: Worker, listeners: ParentListeners, url: str) -> None:
        backoff = Backoff(floor=RESTART_FLOOR, ceiling=RESTART_CEILING)
        while not self._stopping:
            read_end, write_end = os.pipe()
            os.set_inheritable(write_end, False)
            env = self._spawn_env(worker, listeners, url, read_end)
            fds = [read_end, *(b.listener.socket.fileno() for b in listeners.shared)]
            worker.ready = False
            worker.last_ping = -math.inf
            worker.exited = trio.Event()
            try:
                worker.process = await trio.lowlevel.open_process(
                    list(self.worker_command), env=env, pass_fds=fds, process_group=0
                )
            finally:
                os.close(read_end)
            started = trio.current_time()
            try:
                status = await worker.process.wait()
            finally:
                os.close(write_end)
            worker.ready = False
            worker.last_status = status
            worker.exited.set()
            if self._stopping:
                return
            if not worker.ever_ready.is_set() and worker.index == 0 and worker.restarts == 0:
                # The first start of the first worker failed: a configuration or database problem
                # that the worker has already reported on stderr (one line). Give up, quietly.
                log.debug(
                    "worker 0 (pid %d) %s while starting; stopping", worker.pid, _describe_status(status)
                )
                self._startup_failed = status if status > 0 else 1
                self._stop.set()
                return
            if trio.current_time() - started >= RESTART_RESET_AFTER:
                backoff.reset()
            delay = backoff.next()
            log.error(
                "worker %d (pid %d) %s; restarting it in %.1f s",
                worker.index,
                worker.pid,
                _describe_status(status),
                delay,
            )
            with trio.move_on_after(delay):
                await self._stop.wait()
            if self._stopping:
                return
            worker.restarts += 1

    async def _receive_notifications(self, worker: Worker, *, task_status: trio.TaskStatus[None]) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with sock:
            await sock.bind(str(worker.notify_path))
            task_status.started()
            while True:
                data = await sock.recv(4096)
                for line in data.decode("utf-8", "replace").splitlines():
                    self._on_notification(worker, line)

    def _on_notification(self, worker: Worker, line: str) -> None:
        if line == "READY=1":
            if not worker.ready and worker.ever_ready.is_set():
                log.info("worker %d (pid %s) is ready again", worker.index, worker.pid)
            worker.ready = True
            worker.last_ping = trio.current_time()
            worker.ever_ready.set()
            worker.readies.value += 1
        elif line == "WATCHDOG=1":
            worker.last_ping = trio.current_time()
        elif line == "STOPPING=1":
            worker.ready = False
        # RELOADING=1: `reload` noted the READY=1 count before forwarding SIGHUP

    async def _watchdog(self, interval: float | None) -> None:
        """Ping systemd only while every worker is alive and pinging; kill a worker that hangs."""
        async for _ in periodic(interval if interval is not None else WORKER_WATCHDOG_INTERVAL):
            now = trio.current_time()
            healthy = True
            for worker in self.workers:
                if not worker.alive or not worker.ready:
                    healthy = False
                elif now - worker.last_ping > WORKER_HANG_TIMEOUT:
                    healthy = False
                    log.error(
                        "worker %d (pid %s) sent no watchdog ping for %.0f s; killing it",
                        worker.index,
                        worker.pid,
                        now - worker.last_ping,
                    )
                    worker.signal(signal.SIGKILL)
            if healthy and interval is not None:
                await self.notifier.notify("WATCHDOG=1")

    async def _stop_workers(self) -> None:
        """SIGTERM every worker and wait for them; SIGKILL what is left after the grace period."""
        self._stopping = True
        for worker in self.workers:
            worker.signal(signal.SIGTERM)
        self._signals_forwarded = 1
        bound = self.config.shutdown_timeout + STOP_MARGIN
        with trio.move_on_after(bound):
            for worker in self.workers:
                if worker.alive:
                    await worker.exited.wait()
        for worker in self.workers:
            if worker.alive:
                log.error(
                    "worker %d (pid %s) did not stop within %g s; killing it", worker.index, worker.pid, bound
                )
                worker.signal(signal.SIGKILL)
        for worker in self.workers:
            if worker.process is not None:
                with trio.CancelScope(shield=True):
                    await worker.process.wait()

    async def _watch_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                await self.reload()
                continue
            name = signal.Signals(signum).name
            if not self._stop.is_set():
                log.info("received %s, stopping %d workers", name, len(self.workers))
                self._stop.set()
            elif self._signals_forwarded:
                log.warning("second stop request: workers cancel their open connections now")
                for worker in self.workers:
                    worker.signal(signal.SIGTERM)

    async def reload(self) -> None:
        """SIGHUP: forward it to every worker (each re-reads the configuration), wait for their READY."""
        await self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            if self.reload_config is not None:
                new = reread_config(self.reload_config, self.config, log)
                if new is None:
                    return
                if new.workers != self.config.workers:
                    log.warning("reloaded; a change of workers takes effect after a restart")
                self.config = attrs.evolve(self.config, log_level=new.log_level)
            waiting: list[tuple[Worker, int]] = []
            for worker in self.workers:
                if worker.alive and worker.ready:
                    waiting.append((worker, worker.readies.value))
                    worker.signal(signal.SIGHUP)
            with trio.move_on_after(FETCH_TIMEOUT):
                for worker, before in waiting:
                    await worker.readies.wait_value(lambda count, before=before: count > before)
            late = [str(w.index) for w, before in waiting if w.readies.value == before]
            if late:
                log.warning(
                    "SIGHUP forwarded; worker(s) %s did not confirm within %g s",
                    ", ".join(late),
                    FETCH_TIMEOUT,
                )
            else:
                log.info("reloaded %d workers", len(waiting))
        finally:
            await self.notifier.notify("READY=1")

    # ---- the operator endpoints

    def _operator_router(self) -> Router:
        router = Router()
        router.add("/metrics", self._handle_metrics)
        router.add("/healthz", self._handle_healthz)
        return router

    async def _fetch_all(self, path: str) -> list[tuple[Worker, int | None, bytes]]:
        results: list[tuple[Worker, int | None, bytes]] = [(w, None, b"") for w in self.workers]

        async def one(i: int, worker: Worker) -> None:
            if not worker.alive or not worker.ever_ready.is_set():
                return
            with trio.move_on_after(FETCH_TIMEOUT):
                try:
                    status, body = await http_get_unix(worker.operator_socket, path)
                except (OSError, trio.BrokenResourceError, ValueError):
                    return
                results[i] = (worker, status, body)

        async with trio.open_nursery() as nursery:
            for i, worker in enumerate(self.workers):
                nursery.start_soon(one, i, worker)
        return results

    async def _handle_metrics(self, request: Request) -> None:
        results = await self._fetch_all("/metrics?timestamps=1")
        texts = [body.decode("utf-8", "replace") for _w, status, body in results if status == 200]
        up = [(w.index, 1.0 if status == 200 else 0.0) for w, status, _ in results]
        families = merge_families(texts) + worker_families(up, [(w.index, w.restarts) for w in self.workers])
        body = generate_latest(private_registry(Families(lambda: families)))
        await request.send_response(200, body, content_type=METRICS_CONTENT_TYPE)

    async def _handle_healthz(self, request: Request) -> None:
        results = await self._fetch_all("/healthz")
        workers: list[dict[str, Any]] = []
        ok = 0
        for worker, status, body in results:
            entry: dict[str, Any] = {"worker": worker.index, "pid": worker.pid, "restarts": worker.restarts}
            if status is None:
                entry["status"] = "starting" if worker.alive else "down"
            else:
                try:
                    answer = json.loads(body)
                except ValueError:
                    answer = {}
                entry["status"] = answer.get("status", "unavailable") if status == 200 else "unavailable"
                if "database" in answer:
                    entry["database"] = answer["database"]
            ok += entry["status"] == "ok"
            workers.append(entry)
        overall = "ok" if ok == len(workers) else "degraded" if ok else "unavailable"
        await request.send_json(
            200 if ok else 503, {"status": overall, "version": __version__, "workers": workers}
        )


async def http_get_unix(path: Path, target: str) -> tuple[int, bytes]:
    """GET `target` from the HTTP server on Unix socket `path`; (status, body). The server closes."""
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: agentd\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := await stream.receive_some(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError("incomplete response")
    return int(head.split(b" ", 2)[1]), body


# --------------------------------------------------------------------------------------------------
# Merging the workers' /metrics


SampleKey = tuple[str, tuple[tuple[str, str], ...]]


@attrs.define
class _Family:
    documentation: str
    samples: dict[SampleKey, tuple[float, float | None]] = attrs.field(factory=dict)


def merge_families(texts: Sequence[str], *, latest_prefix: str = "agentd_agentstats_") -> list[Metric]:
    """One set of metric families from the workers' expositions (parsed by prometheus_client):
    samples of the same name and labels are added up, except agent-reported series (`latest_prefix`),
    where the newest timestamp wins. The merged samples carry no timestamp."""
    # keyed by type too: the parser names a counter family without its _total, so the gauge
    # agentd_agent_sessions and the counter agentd_agent_sessions_total share a name
    families: dict[tuple[str, str], _Family] = {}
    for text in texts:
        for parsed in text_string_to_metric_families(text):
            family = families.setdefault((parsed.name, parsed.type), _Family(parsed.documentation))
            newest_wins = parsed.name.startswith(latest_prefix)
            for sample in parsed.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                ts = float(sample.timestamp) if sample.timestamp is not None else None
                old = family.samples.get(key)
                if old is None:
                    family.samples[key] = (sample.value, ts)
                elif newest_wins:
                    if (ts or 0.0) >= (old[1] or 0.0):
                        family.samples[key] = (sample.value, ts)
                else:
                    family.samples[key] = (old[0] + sample.value, None)
    merged: list[Metric] = []
    for (name, kind), family in families.items():
        metric = Metric(name, family.documentation, kind)
        for (sample_name, labels), (value, _ts) in family.samples.items():
            metric.add_sample(sample_name, dict(labels), value)
        merged.append(metric)
    return merged


def worker_families(up: Iterable[tuple[int, float]], restarts: Iterable[tuple[int, int]]) -> list[Metric]:
    """The parent's own series: which workers answered this scrape, and how often each was restarted."""
    up_family = GaugeMetricFamily(
        "agentd_worker_up", "Whether the worker answered this scrape (1) or not (0).", labels=("worker",)
    )
    for index, value in up:
        up_family.add_metric((str(index),), value)
    restarts_family = CounterMetricFamily(
        "agentd_worker_restarts_total",
        "Times the parent restarted the worker after it died.",
        labels=("worker",),
    )
    for index, count in restarts:
        restarts_family.add_metric((str(index),), count)
    return [up_family, restarts_family]


def merge_expositions(texts: Sequence[str], *, latest_prefix: str = "agentd_agentstats_") -> str:
    """The text exposition of :func:`merge_families`."""
    merged = merge_families(texts, latest_prefix=latest_prefix)
    return exposition(Families(lambda: merged))


def run_parent(config: Config, worker_command: Sequence[str], reload_config: Callable[[], Config]) -> int:
    """`agentd serve` with workers > 1: the parent's whole life (called by agentd.cli)."""
    supervisor = Supervisor(config, worker_command, reload_config)
    return trio.run(supervisor.run)


__all__ = [
    "WORKER_ENV",
    "Supervisor",
    "WorkerSpec",
    "merge_expositions",
    "merge_families",
    "run_parent",
    "run_worker",
    "worker_spec_from_environ",
]
