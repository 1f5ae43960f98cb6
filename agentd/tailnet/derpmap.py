"""The DERP map agents are given (GetManifest) and follow (StreamDERPMaps).

One process-wide ``DERPMapSource`` holds the current ``tailnet_pb2.DERPMap`` in a
``trio_util.AsyncValue``; subscribers iterate ``source.value.eventual_values()`` (current map first,
then each change). The map comes from a JSON file in Tailscale/Coder ``tailcfg.DERPMap`` form
(Coder's ``--derp-config-path``) or is Coder's default: one embedded-relay region 999 whose node
the agent rewrites to its own access URL. ``home_params`` is always set: agents dereference it.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from trio_util import AsyncValue  # type: ignore[import-untyped]

from agentd.proto import tailnet_pb2

EMBEDDED_REGION_ID = 999
EMBEDDED_REGION_CODE = "coder"
EMBEDDED_REGION_NAME = "Coder Embedded Relay"
#: Host of the embedded node when no access URL is configured; the agent replaces it anyway.
PLACEHOLDER_HOST = "localhost"

_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)


class DERPMapError(ValueError):
    """A DERP map file that cannot be used; the message names the offending field."""


def with_home_params(derp_map: tailnet_pb2.DERPMap) -> tailnet_pb2.DERPMap:
    """A copy of ``derp_map`` whose ``home_params`` is present on the wire (``0a 00`` when empty)."""
    out = tailnet_pb2.DERPMap()
    out.CopyFrom(derp_map)
    out.home_params.SetInParent()
    return out


def default_derp_map(
    *, access_url: str | None = None, stun_addresses: Sequence[str] = ()
) -> tailnet_pb2.DERPMap:
    """Coder's default map: region 999 "Coder Embedded Relay" with node ``999b`` (+ STUN-only nodes).

    The node points at ``access_url`` (port 443/80 by scheme unless explicit; ``force_http`` for
    http) or a placeholder; agents rewrite embedded-relay nodes to their own access URL.
    """
    host, port, force_http = PLACEHOLDER_HOST, 443, False
    if access_url:
        parsed = urllib.parse.urlsplit(access_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise DERPMapError(f"access URL {access_url!r} must be an http(s) URL with a host")
        force_http = parsed.scheme == "http"
        host = parsed.hostname
        port = parsed.port or (80 if force_http else 443)
    region = tailnet_pb2.DERPMap.Region(
        region_id=EMBEDDED_REGION_ID,
        embedded_relay=True,
        region_code=EMBEDDED_REGION_CODE,
        region_name=EMBEDDED_REGION_NAME,
    )
    region.nodes.add(
        name=f"{EMBEDDED_REGION_ID}b",
        region_id=EMBEDDED_REGION_ID,
        host_name=host,
        derp_port=port,
        stun_port=-1,
        force_http=force_http,
    )
    for index, address in enumerate(stun_addresses):
        stun_host, sep, stun_port = address.rpartition(":")
        if not sep or not stun_host or not stun_port.isdigit() or not 0 < int(stun_port) < 65536:
            raise DERPMapError(f"STUN address {address!r} must be host:port")
        region.nodes.add(
            name=f"{EMBEDDED_REGION_ID}stun{index}",
            region_id=EMBEDDED_REGION_ID,
            host_name=stun_host.strip("[]"),
            stun_port=int(stun_port),
            stun_only=True,
        )
    derp_map = tailnet_pb2.DERPMap()
    derp_map.regions[EMBEDDED_REGION_ID].CopyFrom(region)
    return with_home_params(derp_map)


# ---- tailcfg.DERPMap JSON ---------------------------------------------------------------------------


def _key(name: str) -> str:
    """Go's encoding/json matches field names case-insensitively; also accept snake_case."""
    return name.replace("_", "").lower()


def _fields(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, Mapping):
        raise DERPMapError(f"{where}: expected an object, got {type(obj).__name__}")
    return {_key(str(k)): v for k, v in obj.items()}


def _int(value: Any, where: str, bounds: tuple[int, int]) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise DERPMapError(f"{where}: expected an integer, got {value!r}")
    if not bounds[0] <= int(value) <= bounds[1]:
        raise DERPMapError(f"{where}: {value} out of range")
    return int(value)


def _int_key(text: str, where: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise DERPMapError(f"{where}: map key {text!r} is not an integer") from None
    return _int(value, where, _INT64)


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise DERPMapError(f"{where}: expected a string, got {value!r}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise DERPMapError(f"{where}: expected true/false, got {value!r}")
    return value


def _float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DERPMapError(f"{where}: expected a number, got {value!r}")
    return float(value)


_NODE_STRINGS = {
    "name": "name",
    "hostname": "host_name",
    "certname": "cert_name",
    "ipv4": "ipv4",
    "ipv6": "ipv6",
    "stuntestip": "stun_test_ip",
}
_NODE_BOOLS = {
    "stunonly": "stun_only",
    "insecurefortests": "insecure_for_tests",
    "forcehttp": "force_http",
    "canport80": "can_port_80",
}
_NODE_INT32 = {"stunport": "stun_port", "derpport": "derp_port"}


def _node(obj: Any, region_id: int, where: str) -> tailnet_pb2.DERPMap.Region.Node:
    fields = _fields(obj, where)
    node = tailnet_pb2.DERPMap.Region.Node(region_id=region_id)
    for key, value in fields.items():
        if value is None:
            continue
        if key in _NODE_STRINGS:
            setattr(node, _NODE_STRINGS[key], _str(value, f"{where}.{key}"))
        elif key in _NODE_BOOLS:
            setattr(node, _NODE_BOOLS[key], _bool(value, f"{where}.{key}"))
        elif key in _NODE_INT32:
            setattr(node, _NODE_INT32[key], _int(value, f"{where}.{key}", _INT32))
        elif key == "regionid":
            node.region_id = _int(value, f"{where}.RegionID", _INT64) or region_id
    if not node.name:
        raise DERPMapError(f"{where}.Name: a node needs a name")
    return node


def _region(obj: Any, key_id: int, where: str) -> tailnet_pb2.DERPMap.Region:
    fields = _fields(obj, where)
    region_id = key_id
    if fields.get("regionid") is not None:
        region_id = _int(fields["regionid"], f"{where}.RegionID", _INT64)
        if region_id != key_id:
            raise DERPMapError(f"{where}.RegionID: {region_id} does not match its map key {key_id}")
    region = tailnet_pb2.DERPMap.Region(region_id=region_id)
    for name, attr in (("regioncode", "region_code"), ("regionname", "region_name")):
        if fields.get(name) is not None:
            setattr(region, attr, _str(fields[name], f"{where}.{name}"))
    for name, attr in (("embeddedrelay", "embedded_relay"), ("avoid", "avoid")):
        if fields.get(name) is not None:
            setattr(region, attr, _bool(fields[name], f"{where}.{name}"))
    nodes = fields.get("nodes") or []
    if not isinstance(nodes, list):
        raise DERPMapError(f"{where}.Nodes: expected a list")
    for index, item in enumerate(nodes):
        region.nodes.append(_node(item, region_id, f"{where}.Nodes[{index}]"))
    return region


def derp_map_from_json(data: Any) -> tailnet_pb2.DERPMap:
    """Build a DERP map from decoded ``tailcfg.DERPMap`` JSON (``{"Regions": {"1": {...}}, ...}``)."""
    fields = _fields(data, "DERPMap")
    derp_map = tailnet_pb2.DERPMap()
    regions = fields.get("regions") or {}
    for key, value in _fields(regions, "DERPMap.Regions").items():
        region_id = _int_key(key, "DERPMap.Regions")
        derp_map.regions[region_id].CopyFrom(_region(value, region_id, f"DERPMap.Regions[{key}]"))
    home = fields.get("homeparams")
    if home is not None:
        scores = _fields(home, "DERPMap.HomeParams").get("regionscore") or {}
        for key, value in _fields(scores, "DERPMap.HomeParams.RegionScore").items():
            where = f"DERPMap.HomeParams.RegionScore[{key}]"
            derp_map.home_params.region_score[_int_key(key, where)] = _float(value, where)
    if not derp_map.regions:
        raise DERPMapError("DERPMap.Regions: the map has no regions")
    return with_home_params(derp_map)


def load_derp_map(path: str | os.PathLike[str]) -> tailnet_pb2.DERPMap:
    """Read a ``tailcfg.DERPMap`` JSON file; any problem is a ``DERPMapError`` naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise DERPMapError(f"reading DERP map {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DERPMapError(f"parsing DERP map {path}: {exc}") from None
    try:
        return derp_map_from_json(data)
    except DERPMapError as exc:
        raise DERPMapError(f"DERP map {path}: {exc}") from None


# ---- the process-wide source -------------------------------------------------------------------------


@attrs.define(eq=False)
class DERPMapSource:
    """The current DERP map plus the deployment DERP flags the manifest carries.

    ``value`` only notifies when the map really changes (protobuf equality), so ``reload`` after a
    no-op edit sends nothing to agents.
    """

    value: AsyncValue[tailnet_pb2.DERPMap]
    path: Path | None = None
    disable_direct_connections: bool = False
    derp_force_websockets: bool = False

    @classmethod
    def from_config(
        cls,
        *,
        path: str | os.PathLike[str] | None = None,
        access_url: str | None = None,
        stun_addresses: Iterable[str] = (),
        disable_direct_connections: bool = False,
        derp_force_websockets: bool = False,
    ) -> DERPMapSource:
        """From the daemon's configuration: a JSON file if ``path`` is set, else Coder's default map."""
        file = Path(path) if path is not None else None
        derp_map = (
            load_derp_map(file)
            if file is not None
            else default_derp_map(access_url=access_url, stun_addresses=tuple(stun_addresses))
        )
        return cls(
            value=AsyncValue(derp_map),
            path=file,
            disable_direct_connections=disable_direct_connections,
            derp_force_websockets=derp_force_websockets,
        )

    def current(self) -> tailnet_pb2.DERPMap:
        """A copy of the current map (callers may modify it), ``home_params`` present."""
        return with_home_params(self.value.value)

    def set(self, derp_map: tailnet_pb2.DERPMap) -> bool:
        """Publish ``derp_map``; True when it differs from the current one (subscribers are woken)."""
        new = with_home_params(derp_map)
        current: tailnet_pb2.DERPMap = self.value.value
        changed = new != current
        self.value.value = new
        return changed

    def reload(self) -> bool:
        """Re-read the JSON file (SIGHUP). A bad file raises ``DERPMapError`` and keeps the old map."""
        if self.path is None:
            return False
        return self.set(load_derp_map(self.path))
