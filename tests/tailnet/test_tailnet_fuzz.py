"""Bad input never crashes: random Coordinate requests and random DERP map JSON."""

from __future__ import annotations

import uuid

from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from agentd.proto import tailnet_pb2
from agentd.tailnet.convert import request_from_proto, response_to_proto
from agentd.tailnet.coordinator import AgentAuth, ClientAuth, CoordinatorCore, Send, TrustedAuth
from agentd.tailnet.derpmap import DERPMapError, derp_map_from_json

AGENT = uuid.UUID(int=0xA)

ids = st.one_of(st.binary(max_size=20), st.just(AGENT.bytes), st.builds(lambda: uuid.uuid4().bytes))
nodes = st.builds(
    tailnet_pb2.Node,
    id=st.integers(-(2**63), 2**63 - 1),
    key=st.binary(max_size=40),
    disco=st.text(max_size=20),
    preferred_derp=st.integers(-(2**31), 2**31 - 1),
    derp_latency=st.dictionaries(st.text(max_size=8), st.floats(allow_nan=True), max_size=3),
    addresses=st.lists(
        st.one_of(st.text(max_size=45), st.sampled_from(["fd7a:115c:a1e0::a/128", "::/0"])), max_size=3
    ),
    allowed_ips=st.lists(st.text(max_size=45), max_size=2),
    endpoints=st.lists(st.text(max_size=30), max_size=2),
)


@st.composite
def coordinate_requests(draw: st.DrawFn) -> tailnet_pb2.CoordinateRequest:
    request = tailnet_pb2.CoordinateRequest()
    if draw(st.booleans()):
        request.update_self.node.CopyFrom(draw(nodes))
    if draw(st.booleans()):
        request.add_tunnel.id = draw(ids)
    if draw(st.booleans()):
        request.remove_tunnel.id = draw(ids)
    if draw(st.integers(0, 9)) == 0:
        request.disconnect.SetInParent()
    for raw in draw(st.lists(ids, max_size=3)):
        request.ready_for_handshake.add(id=raw)
    return request


@settings(max_examples=75, deadline=None)
@given(st.lists(coordinate_requests(), min_size=1, max_size=8))
def test_random_requests_never_raise(requests: list[tailnet_pb2.CoordinateRequest]) -> None:
    core = CoordinatorCore(response_buffer=4)
    refs = [
        core.register(AGENT, "agent", AgentAuth(AGENT))[0],
        core.register(uuid.UUID(int=0xC), "client", ClientAuth({AGENT}))[0],
        core.register(uuid.UUID(int=0xD), "coderd", TrustedAuth())[0],
    ]
    for index, message in enumerate(requests):
        for effect in core.handle_request(refs[index % len(refs)], request_from_proto(message)):
            if isinstance(effect, Send):
                # Whatever the core says must encode.
                response_to_proto(effect.response).SerializeToString()
    core.close()


@settings(max_examples=75, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_as_request(data: bytes) -> None:
    message = tailnet_pb2.CoordinateRequest()
    try:
        message.ParseFromString(data)
    except DecodeError:
        return
    core = CoordinatorCore()
    ref, _ = core.register(AGENT, "agent", AgentAuth(AGENT))
    core.handle_request(ref, request_from_proto(message))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3)
    ),
    max_leaves=8,
)
derp_like = st.fixed_dictionaries(
    {
        "Regions": st.dictionaries(
            st.sampled_from(["1", "2", "x", "-5"]),
            st.fixed_dictionaries(
                {},
                optional={
                    "RegionID": json_values | st.integers(0, 3),
                    "RegionCode": json_values,
                    "EmbeddedRelay": json_values,
                    "Nodes": st.lists(
                        st.fixed_dictionaries(
                            {"Name": st.text(max_size=4) | json_values},
                            optional={
                                "DERPPort": json_values,
                                "STUNPort": json_values,
                                "HostName": json_values,
                            },
                        ),
                        max_size=2,
                    )
                    | json_values,
                },
            )
            | json_values,
            max_size=2,
        )
    },
    optional={"HomeParams": json_values | st.fixed_dictionaries({"RegionScore": json_values})},
)


@settings(max_examples=60, deadline=None)
@given(json_values | derp_like)
def test_random_json_is_a_map_or_a_named_error(data: object) -> None:
    try:
        derp_map = derp_map_from_json(data)
    except DERPMapError as exc:
        assert str(exc)
        return
    assert derp_map.HasField("home_params") and derp_map.regions
    derp_map.SerializeToString()
