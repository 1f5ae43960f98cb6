"""Shared database fixtures.

* ``pg_server`` (session): ``AGENTD_TEST_POSTGRES_URL`` if set, else one embedded pgserver per test
  run. Started lazily — only runs that use a database fixture pay for it.
* ``db_template`` (session): the name of a database migrated to the current schema, made once.
* ``db_url``: a fresh database cloned from the template for this test (dropped afterwards).
* ``empty_db_url``: a fresh, empty (unmigrated) database for migration tests.
* ``db``: an open `agentd.store.Database` on ``db_url`` (trio tests).
* ``pubsub``: a running `agentd.store.PubSub` on ``db`` (its LISTEN task lives until teardown).

These talk to a real server: waits on the database are real I/O that looks idle to trio. The
``autojump_clock`` fixture here therefore overrides pytest-trio's with `agentd.testing.virtual_clock`
(threshold 0), which holds still while a store query is in flight.

Also loads the Go peer fixtures (``go_peer``) for the interop tests.
"""

from __future__ import annotations

import signal
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

import agentd.testing
from agentd.store import Database, PubSub, open_database
from agentd.store.testing import TestServer, test_server

pytest_plugins = ["tests.gopeer"]


def pytest_configure(config: pytest.Config) -> None:
    # `timeout`, CI runners and process managers stop pytest with SIGTERM; turn it into the
    # KeyboardInterrupt pytest handles, so fixture teardown still stops the embedded server.
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, interrupt)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[TestServer]:
    # Not under pytest's tmp_path: concurrent pytest runs of the same user chmod that tree to 0700
    # and prune old numbered directories, which would break a server running as pgserver's user.
    with (
        tempfile.TemporaryDirectory(prefix="agentd-test-pg-") as directory,
        test_server(Path(directory)) as server,
    ):
        yield server


@pytest.fixture(scope="session")
def db_template(pg_server: TestServer) -> Iterator[str]:
    name = pg_server.create_template()
    yield name
    pg_server.drop(name)


@pytest.fixture
def db_url(pg_server: TestServer, db_template: str) -> Iterator[str]:
    name = pg_server.clone(db_template)
    yield pg_server.url_for(name)
    pg_server.drop(name)


@pytest.fixture
def empty_db_url(pg_server: TestServer) -> Iterator[str]:
    name = pg_server.create_empty()
    yield pg_server.url_for(name)
    pg_server.drop(name)


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    async with open_database(db_url, min_size=1, max_size=4) as database:
        yield database


@pytest.fixture
async def pubsub(db: Database) -> AsyncIterator[PubSub]:
    async with trio.open_nursery() as nursery:
        bus = PubSub(db)
        await nursery.start(bus.run)
        yield bus
        nursery.cancel_scope.cancel()


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    """pytest-trio's autojump clock, except that it never jumps while PostgreSQL is answering."""
    return agentd.testing.virtual_clock(threshold=0)
