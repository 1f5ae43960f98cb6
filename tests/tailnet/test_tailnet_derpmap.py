"""DERP map source: Coder's default map, tailcfg JSON files, home_params on the wire, reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from agentd.proto import tailnet_pb2
from agentd.tailnet.derpmap import (
    DERPMapError,
    DERPMapSource,
    default_derp_map,
    derp_map_from_json,
    load_derp_map,
    with_home_params,
)

TAILCFG_JSON = {
    "HomeParams": {"RegionScore": {"1": 0.5}},
    "Regions": {
        "1": {
            "RegionID": 1,
            "RegionCode": "nyc",
            "RegionName": "New York",
            "Avoid": False,
            "Nodes": [
                {
                    "Name": "1a",
                    "RegionID": 1,
                    "HostName": "derp1.example.com",
                    "IPv4": "192.0.2.10",
                    "IPv6": "2001:db8::10",
                    "STUNPort": 3478,
                    "DERPPort": 443,
                    "CanPort80": True,
                }
            ],
        },
        "999": {
            "EmbeddedRelay": True,
            "RegionCode": "coder",
            "RegionName": "Coder Embedded Relay",
            "Nodes": [{"Name": "999b", "HostName": "coder.example.com", "ForceHTTP": True, "STUNPort": -1}],
        },
    },
    "OmitDefaultRegions": True,
}


def test_default_map_is_one_embedded_region_with_home_params() -> None:
    derp_map = default_derp_map()
    assert list(derp_map.regions) == [999]
    region = derp_map.regions[999]
    assert (region.region_code, region.region_name, region.embedded_relay) == (
        "coder",
        "Coder Embedded Relay",
        True,
    )
    [node] = region.nodes
    assert (node.name, node.region_id, node.derp_port, node.stun_port) == ("999b", 999, 443, -1)
    # home_params is on the wire even though it is empty: field 1, length 0.
    assert derp_map.HasField("home_params")
    assert derp_map.SerializeToString().startswith(b"\x0a\x00")


def test_default_map_follows_access_url_and_stun() -> None:
    derp_map = default_derp_map(
        access_url="http://coder.internal:3000", stun_addresses=["stun.example.com:3478"]
    )
    embedded, stun = derp_map.regions[999].nodes
    assert (embedded.host_name, embedded.derp_port, embedded.force_http) == ("coder.internal", 3000, True)
    assert (stun.name, stun.host_name, stun.stun_port, stun.stun_only) == (
        "999stun0",
        "stun.example.com",
        3478,
        True,
    )
    https = default_derp_map(access_url="https://coder.example.com").regions[999].nodes[0]
    assert (https.derp_port, https.force_http) == (443, False)


@pytest.mark.parametrize(("kwargs"), [{"access_url": "ftp://x"}, {"stun_addresses": ["nohost"]}])
def test_default_map_rejects_bad_config(kwargs: dict[str, object]) -> None:
    with pytest.raises(DERPMapError):
        default_derp_map(**kwargs)  # type: ignore[arg-type]


def test_tailcfg_json() -> None:
    derp_map = derp_map_from_json(TAILCFG_JSON)
    assert sorted(derp_map.regions) == [1, 999]
    node = derp_map.regions[1].nodes[0]
    assert (node.host_name, node.ipv4, node.ipv6, node.stun_port, node.derp_port, node.can_port_80) == (
        "derp1.example.com",
        "192.0.2.10",
        "2001:db8::10",
        3478,
        443,
        True,
    )
    embedded = derp_map.regions[999]
    assert embedded.region_id == 999 and embedded.embedded_relay
    assert embedded.nodes[0].region_id == 999 and embedded.nodes[0].force_http
    assert dict(derp_map.home_params.region_score) == {1: 0.5}


def test_json_keys_case_insensitive_and_snake_case() -> None:
    derp_map = derp_map_from_json(
        {"regions": {"7": {"region_code": "x", "nodes": [{"name": "7a", "host_name": "h"}]}}}
    )
    assert derp_map.regions[7].region_code == "x"
    assert derp_map.regions[7].nodes[0].host_name == "h"
    assert derp_map.HasField("home_params")


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ([], "DERPMap: expected an object"),
        ({"Regions": {}}, "no regions"),
        ({"Regions": {"x": {}}}, "not an integer"),
        ({"Regions": {"1": {"RegionID": 2}}}, "RegionID: 2 does not match"),
        (
            {"Regions": {"1": {"Nodes": [{"Name": "a", "DERPPort": "443"}]}}},
            "Nodes[0].derpport: expected an integer",
        ),
        ({"Regions": {"1": {"Nodes": [{"Name": "a", "STUNPort": 2**40}]}}}, "out of range"),
        ({"Regions": {"1": {"Nodes": [{"HostName": "a"}]}}}, "needs a name"),
        ({"Regions": {"1": {"Avoid": "yes"}}}, "avoid: expected true/false"),
        (
            {"Regions": {"1": {}}, "HomeParams": {"RegionScore": {"1": "high"}}},
            "RegionScore[1]: expected a number",
        ),
    ],
)
def test_bad_json_names_the_field(data: object, field: str) -> None:
    with pytest.raises(DERPMapError) as info:
        derp_map_from_json(data)
    assert field in str(info.value)


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DERPMapError, match="reading DERP map"):
        load_derp_map(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DERPMapError, match="parsing DERP map"):
        load_derp_map(bad)


def test_with_home_params_copies() -> None:
    bare = tailnet_pb2.DERPMap()
    out = with_home_params(bare)
    assert out.HasField("home_params") and not bare.HasField("home_params")


async def test_source_reload_notifies_subscribers_only_on_change(tmp_path: Path) -> None:
    path = tmp_path / "derp.json"
    path.write_text(json.dumps(TAILCFG_JSON))
    source = DERPMapSource.from_config(path=path, disable_direct_connections=True)
    assert source.disable_direct_connections and not source.derp_force_websockets
    seen: list[tailnet_pb2.DERPMap] = []

    async def subscriber() -> None:
        async for derp_map in source.value.eventual_values():
            seen.append(derp_map)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(subscriber)
        await trio.testing.wait_all_tasks_blocked()
        assert len(seen) == 1
        assert source.reload() is False  # same content: nobody is woken
        await trio.testing.wait_all_tasks_blocked()
        assert len(seen) == 1
        changed = dict(TAILCFG_JSON, Regions={"5": {"Nodes": [{"Name": "5a"}]}})
        path.write_text(json.dumps(changed))
        assert source.reload() is True
        await trio.testing.wait_all_tasks_blocked()
        assert [sorted(m.regions) for m in seen] == [[1, 999], [5]]
        # A broken file keeps the current map.
        path.write_text("[]")
        with pytest.raises(DERPMapError):
            source.reload()
        assert sorted(source.current().regions) == [5]
        nursery.cancel_scope.cancel()


def test_source_default_and_set() -> None:
    source = DERPMapSource.from_config(access_url="https://coder.example.com")
    assert source.reload() is False  # nothing to reload without a file
    current = source.current()
    current.regions[999].region_name = "mutated copy"
    assert source.current().regions[999].region_name == "Coder Embedded Relay"
    assert source.set(tailnet_pb2.DERPMap(regions={3: tailnet_pb2.DERPMap.Region(region_id=3)}))
    assert source.current().HasField("home_params")
