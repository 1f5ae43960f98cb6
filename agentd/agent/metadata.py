"""Workspace metadata: run each description's script at its interval, report changed values.

The manifest carries each description's interval and timeout as a whole number of *seconds stored in
the nanoseconds* of a Duration (spec §7.1's quirk); :func:`quirk_seconds` reads them back the way
Coder's agent does. Results are reported with BatchUpdateMetadata about once a second, only for keys
whose value or error changed since the last report on this connection.
"""

from __future__ import annotations

import datetime as dt
import math
import subprocess
from collections.abc import Callable, Mapping

import attrs
import trio
from google.protobuf.duration_pb2 import Duration

from agentd.proto import agent_pb2

__all__ = ["MetadataCollector", "quirk_seconds"]

#: The timeout when the description has none.
DEFAULT_TIMEOUT = 5.0
REPORT_INTERVAL = 1.0
MAX_OUTPUT = 4096


def quirk_seconds(duration: Duration) -> float:
    """The manifest's metadata Duration: its total nanoseconds are the number of seconds."""
    return float(duration.seconds * 1_000_000_000 + duration.nanos)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@attrs.frozen
class Result:
    value: str
    error: str
    collected_at: dt.datetime


@attrs.define(eq=False)
class MetadataCollector:
    """Latest result per key (for one connection) and which of them the server has not seen yet."""

    descriptions: list[agent_pb2.WorkspaceAgentMetadata.Description]
    env: Mapping[str, str]
    cwd: str
    shell: str = "/bin/sh"
    now: Callable[[], dt.datetime] = _utcnow
    results: dict[str, Result] = attrs.field(factory=dict, init=False)
    _reported: dict[str, tuple[str, str]] = attrs.field(factory=dict, init=False)
    _changed: trio.Event = attrs.field(factory=trio.Event, init=False)

    async def run(self) -> None:
        """One collection loop per description, forever."""
        async with trio.open_nursery() as nursery:
            for description in self.descriptions:
                nursery.start_soon(self._collect_loop, description)

    async def _collect_loop(self, description: agent_pb2.WorkspaceAgentMetadata.Description) -> None:
        interval = quirk_seconds(description.interval)
        timeout = quirk_seconds(description.timeout) or DEFAULT_TIMEOUT
        while True:
            self._store(description.key, await self.collect(description.script, timeout))
            if interval <= 0:
                return  # no interval: collected once
            await trio.sleep(interval)

    async def collect(self, script: str, timeout: float) -> Result:  # noqa: ASYNC109 - the script's own bound
        """Run one metadata script: its trimmed output is the value; failures become the error."""
        value, error = "", ""
        with trio.move_on_after(timeout if timeout > 0 else math.inf) as deadline:
            try:
                done = await trio.run_process(
                    [self.shell, "-c", script],
                    stdin=subprocess.DEVNULL,
                    capture_stdout=True,
                    stderr=subprocess.STDOUT,
                    check=False,
                    cwd=self.cwd,
                    env=dict(self.env),
                )
            except OSError as exc:
                error = f"run {self.shell}: {exc}"
            else:
                value = done.stdout[:MAX_OUTPUT].decode("utf-8", "replace").strip()
                if done.returncode != 0:
                    error = f"exit status {done.returncode}"
        if deadline.cancelled_caught:
            error = f"timed out after {timeout:g}s"
        return Result(value, error, self.now())

    def _store(self, key: str, result: Result) -> None:
        self.results[key] = result
        if self._reported.get(key) != (result.value, result.error):
            self._changed.set()

    def changed(self) -> dict[str, Result]:
        return {
            key: result
            for key, result in self.results.items()
            if self._reported.get(key) != (result.value, result.error)
        }

    async def wait_changed(self) -> None:
        if not self.changed():
            self._changed = trio.Event()
            await self._changed.wait()

    def request(self, changed: Mapping[str, Result]) -> agent_pb2.BatchUpdateMetadataRequest:
        request = agent_pb2.BatchUpdateMetadataRequest()
        for key, result in changed.items():
            entry = request.metadata.add(key=key)
            entry.result.value = result.value
            entry.result.error = result.error
            entry.result.collected_at.FromDatetime(result.collected_at)
        return request

    def mark_reported(self, changed: Mapping[str, Result]) -> None:
        for key, result in changed.items():
            self._reported[key] = (result.value, result.error)
