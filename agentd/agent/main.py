"""The ``agentd agent`` process: an :class:`Agent` for a ``--url`` with Ctrl-C handling."""

from __future__ import annotations

import functools
import signal
import sys

import trio

from agentd.agent.agent import Agent
from agentd.agent.dial import open_target, parse_target

__all__ = ["run_agent", "say"]


def say(line: str) -> None:
    print(f"agent: {line}", flush=True)


async def run_agent(
    url: str,
    *,
    token: str,
    websocket: bool = False,
    boundary_logs: int = 0,
    exit_after_ready: bool = False,
) -> int:
    """Run until Ctrl-C / SIGTERM (graceful: shutting_down → stop scripts → off; twice = now) or, with
    ``exit_after_ready``, until startup finished. Returns the exit status."""
    target = parse_target(url)
    agent = Agent(
        token=token,
        dial=functools.partial(open_target, target),
        where=str(target),
        websocket=websocket,
        host=target.http_host,
        say=say,
        boundary_logs=boundary_logs,
        exit_after_ready=exit_after_ready,
    )
    say(f"{agent.version} dialing {target} ({'websocket' if websocket else 'raw yamux'})")
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for _ in signals:
                    agent.stop()

            nursery.start_soon(watch)
            await agent.run()
            nursery.cancel_scope.cancel()
    say("exited")
    sys.stdout.flush()
    return agent.exit_status
