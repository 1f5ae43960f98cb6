"""Pure parts of the reference agent: URL parsing, backoff, lifecycle order, log batching, the
metadata interval quirk, the agent's tailnet addresses and its script runner on a real shell."""

from __future__ import annotations

import datetime as dt
import random
import uuid

import pytest
import trio
from google.protobuf.duration_pb2 import Duration

from agentd.agent.agent import describe_error, expand_directory, fake_node, service_address
from agentd.agent.backoff import Backoff
from agentd.agent.dial import Target, TargetError, parse_target
from agentd.agent.lifecycle import Lifecycle
from agentd.agent.logs import MAX_BATCH_BYTES, LogQueue, QueuedLog
from agentd.agent.metadata import MetadataCollector, quirk_seconds
from agentd.agent.scripts import ScriptRunner, script_label
from agentd.client import RpcError
from agentd.proto import agent_pb2, tailnet_pb2

S = agent_pb2.Lifecycle
T0 = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)


def test_parse_target() -> None:
    assert parse_target("unix:/run/agentd.sock") == Target("unix", path="/run/agentd.sock")
    assert parse_target("unix:///run/a.sock") == Target("unix", path="/run/a.sock")
    assert parse_target("tcp://127.0.0.1:3113") == Target("tcp", host="127.0.0.1", port=3113)
    assert parse_target("tcp://[::1]:80") == Target("tcp", host="::1", port=80)
    assert str(parse_target("tcp://[::1]:80")) == "tcp://[::1]:80"
    assert parse_target("tcp://example.com:443").http_host == "example.com:443"
    assert parse_target("unix:/x").http_host == "agentd"
    for bad in (
        "unix:",
        "tcp://host",
        "tcp://:80",
        "tcp://h:0",
        "tcp://h:99999",
        "http://h:1",
        "tcp://[::1]",
    ):
        with pytest.raises(TargetError):
            parse_target(bad)


def test_backoff_doubles_with_jitter_up_to_the_ceiling_and_resets() -> None:
    backoff = Backoff(rng=random.Random(7))
    delays = [backoff.next() for _ in range(12)]
    for n, delay in enumerate(delays):
        base = min(10.0, 0.1 * 2**n)
        assert base / 2 <= delay <= base
    assert max(delays) <= 10.0
    backoff.reset()
    assert backoff.next() <= 0.1


def test_lifecycle_moves_forward_only_and_tracks_acknowledgements() -> None:
    lifecycle = Lifecycle(now=lambda: T0)
    assert lifecycle.enter(S.CREATED) and lifecycle.enter(S.STARTING)
    assert not lifecycle.enter(S.CREATED)  # backwards: ignored
    assert lifecycle.enter(S.READY)
    assert [s for s, _ in lifecycle.pending()] == [S.CREATED, S.STARTING, S.READY]
    lifecycle.acknowledge()
    assert [s for s, _ in lifecycle.pending()] == [S.STARTING, S.READY]
    assert lifecycle.was_reported(frozenset({S.READY})) is None
    lifecycle.acknowledge()
    lifecycle.acknowledge()
    assert lifecycle.was_reported(frozenset({S.READY, S.START_ERROR})) == S.READY
    request = Lifecycle.request(S.READY, T0)
    assert request.lifecycle.state == S.READY and request.lifecycle.changed_at.ToDatetime(dt.UTC) == T0


def test_log_queue_batches_per_source_up_to_a_mebibyte_and_commits() -> None:
    queue = LogQueue()
    a, b = uuid.uuid4(), uuid.uuid4()
    big = "x" * (400 * 1024)
    for _ in range(3):
        queue.add(a, QueuedLog(T0, big))
    queue.add(b, QueuedLog(T0, "hello"))
    source, batch = queue.take_batch() or (None, [])
    assert source == a and len(batch) == 2 and sum(log.size for log in batch) <= MAX_BATCH_BYTES
    queue.commit(a, 2)
    assert queue.take_batch() == (a, [QueuedLog(T0, big)])
    queue.commit(a, 1)
    source, batch = queue.take_batch() or (None, [])
    assert source == b
    request = LogQueue.request(b, batch)
    assert request.log_source_id == b.bytes and [log.output for log in request.logs] == ["hello"]
    queue.exceed_limit()
    assert queue.empty and queue.dropped == 1
    queue.add(b, QueuedLog(T0, "after the limit"))
    assert queue.empty and queue.dropped == 2


def test_a_single_line_larger_than_a_batch_is_sent_alone() -> None:
    queue = LogQueue()
    source = uuid.uuid4()
    queue.add(source, QueuedLog(T0, "y" * (MAX_BATCH_BYTES + 10)))
    queue.add(source, QueuedLog(T0, "small"))
    assert [len(b) for b in [queue.take_batch() or (None, [])][0][1:]] == [1]


def test_metadata_durations_are_seconds_in_nanoseconds() -> None:
    assert quirk_seconds(Duration(nanos=10)) == 10.0
    assert quirk_seconds(Duration(seconds=0, nanos=3600)) == 3600.0
    assert quirk_seconds(Duration()) == 0.0


def test_service_addresses_and_fake_node() -> None:
    agent_id = uuid.UUID("8d9f5db5-7d3a-4db8-bd70-d972d5527216")
    assert (
        service_address(bytes.fromhex("fd7a115ca1e0"), agent_id)
        == "fd7a:115c:a1e0:4db8:bd70:d972:d552:7216/128"
    )
    derp = tailnet_pb2.DERPMap()
    derp.regions[999].region_code = "agentd"
    node = fake_node(agent_id, derp, random.Random(1))
    assert node.preferred_derp == 999 and len(node.addresses) == 2
    assert node.addresses[1].startswith("fd60:627a:a42b:4db8:") and list(node.allowed_ips) == list(
        node.addresses
    )
    assert node.disco.startswith("discokey:") and len(node.key) == 34


def test_expand_directory() -> None:
    env = {"HOME": "/home/alice", "PROJ": "web"}
    assert expand_directory("", env) == "/home/alice"
    assert expand_directory("~/src/$PROJ", env) == "/home/alice/src/web"
    assert expand_directory("/srv", env) == "/srv"
    assert expand_directory("/w/${PROJ}/$UNSET/x", env) == "/w/web//x"


def test_describe_error_unwraps_groups() -> None:
    group = ExceptionGroup("x", [ExceptionGroup("y", [RpcError("boom", 0)])])
    assert describe_error(group) == "RPC error: boom"
    assert describe_error(trio.BrokenResourceError("gone")) == "BrokenResourceError: gone"


def _script(text: str, *, timeout: float = 0, name: str = "") -> agent_pb2.WorkspaceAgentScript:
    script = agent_pb2.WorkspaceAgentScript(
        id=uuid.uuid4().bytes, log_source_id=uuid.uuid4().bytes, script=text, display_name=name
    )
    if timeout:
        script.timeout.FromSeconds(int(timeout))
    return script


async def test_script_runner_statuses(tmp_path: object) -> None:
    queue = LogQueue()
    runner = ScriptRunner(queue, env={"PATH": "/usr/bin:/bin", "GREETING": "hi"}, cwd="/")
    ok = await runner.run(_script("echo $GREETING; echo oops >&2; printf 'no newline'", name="hello"))
    assert (ok.status, ok.exit_code, ok.lines, ok.label) == (agent_pb2.Timing.OK, 0, 3, "hello")
    _, batch = queue.take_batch() or (None, [])
    assert [log.output for log in batch] == ["hi", "oops", "no newline"]
    failed = await runner.run(_script("exit 3"))
    assert (failed.status, failed.exit_code) == (agent_pb2.Timing.EXIT_FAILURE, 3)
    assert failed.describe() == 'script "exit 3" failed (exit 3) (0 lines logged)'
    timed_out = await runner.run(_script("echo start; sleep 30", timeout=1))
    assert timed_out.status == agent_pb2.Timing.TIMED_OUT
    assert (timed_out.ended_at - timed_out.started_at).total_seconds() < 10
    timing = ok.timing(agent_pb2.Timing.START).timing
    assert timing.script_id == ok.script_id.bytes and timing.status == agent_pb2.Timing.OK
    assert script_label(_script("x" * 100)).endswith("...")


async def test_metadata_collector_values_errors_and_changes() -> None:
    desc = agent_pb2.WorkspaceAgentMetadata.Description
    collector = MetadataCollector(
        [
            desc(key="a", script="echo  1 ", interval=Duration(nanos=0)),
            desc(key="b", script="echo x; exit 2"),
        ],
        env={"PATH": "/usr/bin:/bin"},
        cwd="/",
    )
    await collector.run()  # interval 0: each collected once
    changed = collector.changed()
    assert {k: (r.value, r.error) for k, r in changed.items()} == {
        "a": ("1", ""),
        "b": ("x", "exit status 2"),
    }
    request = collector.request(changed)
    assert sorted(m.key for m in request.metadata) == ["a", "b"]
    collector.mark_reported(changed)
    assert collector.changed() == {}
    slow = await collector.collect("sleep 5", 0.2)
    assert slow.error == "timed out after 0.2s"
