"""Running the manifest's scripts for real: ``/bin/sh -c`` in a subprocess with the script timeout.

Output (stdout and stderr together) is split into lines and queued for BatchCreateLogs under the
script's log source. Each run ends with a timing (stage, status, exit code, start/end) that the agent
reports with ScriptCompleted. Statuses follow Coder's runner: ``ok``; ``exit_failure`` (non-zero
exit or the shell failed to start); ``timed_out`` (the whole process group is killed); and
``pipes_left_open`` when the script exited but something it started still holds the output open.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import os
import signal
import subprocess
import uuid
from collections.abc import Awaitable, Callable, Mapping

import attrs
import trio

from agentd.agent.logs import LogQueue, QueuedLog
from agentd.proto import agent_pb2

__all__ = ["ScriptResult", "ScriptRunner", "script_label"]

Timing = agent_pb2.Timing
#: After the script exits, how long its output pipe may stay open before we stop reading.
PIPE_GRACE = 5.0
#: Between SIGTERM and SIGKILL for a timed-out script's process group.
KILL_GRACE = 3.0
MAX_LINE = 64 * 1024


def script_label(script: agent_pb2.WorkspaceAgentScript) -> str:
    """The name a person recognises: display name, else the first line of the script."""
    if script.display_name:
        return script.display_name
    first = script.script.strip().splitlines()[0] if script.script.strip() else ""
    return first if len(first) <= 40 else first[:37] + "..."


@attrs.frozen
class ScriptResult:
    script_id: uuid.UUID
    label: str
    status: agent_pb2.Timing.Status
    exit_code: int
    started_at: dt.datetime
    ended_at: dt.datetime
    lines: int

    def timing(self, stage: agent_pb2.Timing.Stage) -> agent_pb2.WorkspaceAgentScriptCompletedRequest:
        request = agent_pb2.WorkspaceAgentScriptCompletedRequest()
        timing = request.timing
        timing.script_id = self.script_id.bytes
        timing.start.FromDatetime(self.started_at)
        timing.end.FromDatetime(self.ended_at)
        timing.exit_code = self.exit_code
        timing.stage = stage
        timing.status = self.status
        return request

    def describe(self) -> str:
        status = {
            Timing.OK: f"exited {self.exit_code}",
            Timing.EXIT_FAILURE: f"failed (exit {self.exit_code})",
            Timing.TIMED_OUT: "timed out",
            Timing.PIPES_LEFT_OPEN: f"exited {self.exit_code} but left its output open",
        }[self.status]
        lines = "1 line" if self.lines == 1 else f"{self.lines} lines"
        return f'script "{self.label}" {status} ({lines} logged)'


async def _kill_group(process: trio.Process) -> None:
    """Cancel delivery for run_process: SIGTERM the script's session, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, math.inf)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        with trio.move_on_after(wait):
            await process.wait()
            return


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@attrs.define(eq=False)
class ScriptRunner:
    """Runs scripts with the agent's environment in its working directory; queues their output."""

    logs: LogQueue
    env: Mapping[str, str]
    cwd: str
    shell: str = "/bin/sh"
    now: Callable[[], dt.datetime] = _utcnow

    async def run(self, script: agent_pb2.WorkspaceAgentScript) -> ScriptResult:
        raw_source = script.log_source_id
        source = uuid.UUID(bytes=raw_source) if len(raw_source) == 16 else uuid.UUID(int=0)
        timeout = script.timeout.ToTimedelta().total_seconds() if script.HasField("timeout") else 0.0
        started = self.now()
        status: agent_pb2.Timing.Status = Timing.OK
        exit_code = 0
        lines = 0
        pumped = trio.Event()

        async def pump(stream: trio.abc.ReceiveStream) -> None:
            nonlocal lines
            pending = b""
            try:
                async for chunk in stream:
                    pending += chunk
                    *complete, pending = pending.split(b"\n")
                    while len(pending) > MAX_LINE:
                        complete.append(pending[:MAX_LINE])
                        pending = pending[MAX_LINE:]
                    for raw in complete:
                        self._log(source, raw)
                        lines += 1
                if pending:
                    self._log(source, pending)
                    lines += 1
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass
            finally:
                pumped.set()

        try:
            async with trio.open_nursery() as nursery:
                process: trio.Process = await nursery.start(
                    functools.partial(
                        trio.run_process,
                        [self.shell, "-c", script.script],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        check=False,
                        cwd=self.cwd,
                        env=dict(self.env),
                        start_new_session=True,
                        deliver_cancel=_kill_group,
                    )
                )
                assert process.stdout is not None
                stdout = process.stdout
                nursery.start_soon(pump, stdout)
                with trio.move_on_after(timeout if timeout > 0 else math.inf) as deadline:
                    await process.wait()
                if deadline.cancelled_caught:
                    status = Timing.TIMED_OUT
                    await _kill_group(process)
                with trio.move_on_after(PIPE_GRACE):
                    await pumped.wait()
                if not pumped.is_set():
                    if status == Timing.OK:
                        status = Timing.PIPES_LEFT_OPEN
                    await stdout.aclose()
                exit_code = process.returncode if process.returncode is not None else -1
        except OSError as exc:  # the shell itself could not start
            self._log(source, f"agent: could not start {self.shell}: {exc}".encode(), agent_pb2.Log.ERROR)
            lines += 1
            status, exit_code = Timing.EXIT_FAILURE, -1
        if status == Timing.OK and exit_code != 0:
            status = Timing.EXIT_FAILURE
        if status == Timing.TIMED_OUT:
            self._log(source, f"script timed out after {timeout:g}s".encode(), agent_pb2.Log.ERROR)
            lines += 1
        return ScriptResult(
            script_id=uuid.UUID(bytes=script.id) if len(script.id) == 16 else uuid.UUID(int=0),
            label=script_label(script),
            status=status,
            exit_code=exit_code,
            started_at=started,
            ended_at=self.now(),
            lines=lines,
        )

    def _log(self, source: uuid.UUID, raw: bytes, level: agent_pb2.Log.Level = agent_pb2.Log.INFO) -> None:
        text = raw.rstrip(b"\r").decode("utf-8", "replace")
        self.logs.add(source, QueuedLog(self.now(), text, level))


async def run_all(
    runner: ScriptRunner,
    scripts: list[agent_pb2.WorkspaceAgentScript],
    on_result: Callable[[ScriptResult], Awaitable[None]],
) -> list[ScriptResult]:
    """Run ``scripts`` concurrently (Coder runs start scripts in parallel); results in script order."""
    results: list[ScriptResult | None] = [None] * len(scripts)

    async def one(index: int, script: agent_pb2.WorkspaceAgentScript) -> None:
        result = await runner.run(script)
        results[index] = result
        await on_result(result)

    async with trio.open_nursery() as nursery:
        for index, script in enumerate(scripts):
            nursery.start_soon(one, index, script)
    return [r for r in results if r is not None]
