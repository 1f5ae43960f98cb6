"""RecvBuffer (a stream's received chunks) behaves like one byte string read from the front."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agentd.mux.state import RecvBuffer

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.binary(max_size=40)),
        st.tuples(st.just("take"), st.integers(min_value=1, max_value=100)),
        st.tuples(st.just("clear"), st.none()),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_recv_buffer_matches_a_bytearray(ops: list[tuple[str, object]]) -> None:
    buf = RecvBuffer()
    model = bytearray()
    for op, arg in ops:
        if op == "append":
            assert isinstance(arg, bytes)
            buf.append(arg)
            model += arg
        elif op == "take":
            assert isinstance(arg, int)
            got = buf.take(arg)
            assert isinstance(got, bytes)
            assert got == bytes(model[:arg])
            del model[:arg]
        else:
            buf.clear()
            model.clear()
        assert len(buf) == len(model)
        assert bool(buf) == bool(model)
        assert bytes(buf) == bytes(model)


def test_whole_chunk_is_handed_over_without_a_copy() -> None:
    buf = RecvBuffer()
    chunk = bytes(range(256)) * 1024
    buf.append(chunk)
    assert buf.take(1 << 20) is chunk
