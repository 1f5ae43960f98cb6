"""Subscription buffer semantics (pure, no database): order kept, every loss flagged by a MISSED
marker, no spurious markers."""

from __future__ import annotations

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from agentd.store.pubsub import MISSED, Missed, Subscription

OPS = st.lists(st.one_of(st.just("deliver"), st.just("take"), st.just("missed")), max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops=OPS, capacity=st.integers(min_value=1, max_value=5))
def test_order_and_missed_markers(ops: list[str], capacity: int) -> None:
    async def run() -> None:
        sub = Subscription("c", capacity)
        delivered: list[str] = []
        taken: list[str | Missed] = []
        missed_expected = False  # a drop or reconnect happened that the consumer has not yet been told about
        losses = 0

        async def take() -> None:
            taken.append(await sub.__anext__())

        for op in ops:
            if op == "deliver":
                item = str(len(delivered))
                if sub.pending() >= capacity:
                    missed_expected = True
                    losses += 1
                delivered.append(item)
                sub._deliver(item)
            elif op == "missed":
                missed_expected = True
                losses += 1
                sub._deliver(MISSED)
            elif sub.pending() or sub._overflowed:
                await take()
                if taken[-1] is MISSED:
                    missed_expected = False
            assert sub.pending() <= capacity + 2
        while sub.pending() or sub._overflowed:
            await take()
            if taken[-1] is MISSED:
                missed_expected = False
        assert not missed_expected

        payloads = [t for t in taken if t is not MISSED]
        assert [int(p) for p in payloads] == sorted(int(p) for p in payloads)  # order kept
        # Any gap in the delivered sequence is preceded by a MISSED marker.
        previous = -1
        saw_missed = False
        for t in taken:
            if t is MISSED:
                saw_missed = True
                continue
            assert isinstance(t, str)
            if int(t) != previous + 1:
                assert saw_missed, (taken, delivered)
            previous, saw_missed = int(t), False
        if len(payloads) < len(delivered):
            assert MISSED in taken
        # No spurious markers: at most one per loss event.
        assert taken.count(MISSED) <= losses

    trio.run(run)
