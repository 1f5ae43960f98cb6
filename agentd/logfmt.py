"""``key=value`` log lines that a person, ``grep`` and a log shipper can all read.

agentd's log levels: ``info`` is the process's own life (startup, listeners, ready, reloads, stop,
coordinator health) and boundary audit lines; ``warning``/``error`` are failures someone should look
at; ``debug`` is everything per connection and per call (upgrade, connect, every RPC, disconnect,
batcher flushes, pubsub reconnects). A line about one agent carries ``agent_id=<uuid>``, so
``journalctl -u agentd | grep agent_id=<uuid>`` follows one agent among many.
"""

from __future__ import annotations

from collections.abc import Mapping
from time import perf_counter

__all__ = ["elapsed_ms", "logfmt", "quote"]


def quote(value: object) -> str:
    """A value as logfmt writes it: bare, or double-quoted (with ``\\``, ``"`` and newlines escaped)
    when it is empty or holds a space, quote, ``=`` or control character."""
    text = str(value)
    if text and not any(c in text for c in ' "=\\') and text.isprintable():
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    if not escaped.isprintable():
        # one line whatever the value holds: \n, \t, \x1b ... as Python writes them
        escaped = "".join(
            c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in escaped
        )
    return '"' + escaped + '"'


def logfmt(fields: Mapping[str, object]) -> str:
    """``key=value`` pairs, in order, values quoted as :func:`quote` does."""
    return " ".join(f"{key}={quote(value)}" for key, value in fields.items())


def elapsed_ms(started: float) -> float:
    """Milliseconds since ``started`` (a :func:`time.perf_counter` reading)."""
    return (perf_counter() - started) * 1000.0
