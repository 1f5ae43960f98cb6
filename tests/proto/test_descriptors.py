"""The compiled coder.agent.v2 / coder.tailnet.v2 descriptors match Coder's API 2.10 facts.

The facts file (../shared/spec/agent-proto-facts.json, dumped from Coder's own protos) lists every
message, field, enum and RPC the Go agent relies on. A wrong number or type here would not fail
loudly at runtime: it would silently mis-decode on the wire. So every fact is compared and every
problem is reported at once. Fields, enum values and methods beyond the facts are allowed.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest
from google.protobuf import descriptor_pb2

from agentd.proto import AGENT_SERVICE, TAILNET_SERVICE, agent_pb2, rpc_path, tailnet_pb2

REPO = Path(__file__).resolve().parents[2]
FACTS_RELATIVE = Path("shared") / "spec" / "agent-proto-facts.json"

FDP = descriptor_pb2.FieldDescriptorProto


# ----------------------------------------------------------------------------------------------
# Locating the facts
# ----------------------------------------------------------------------------------------------


def _main_checkout(repo: Path) -> Path | None:
    """The main checkout of a git worktree (whose sibling holds shared/), or None for a plain clone."""
    dot_git = repo / ".git"
    if not dot_git.is_file():
        return None
    text = dot_git.read_text().strip()
    if not text.startswith("gitdir:"):
        return None
    gitdir = (repo / text.removeprefix("gitdir:").strip()).resolve()
    commondir_file = gitdir / "commondir"
    if not commondir_file.is_file():
        return None
    common = (gitdir / commondir_file.read_text().strip()).resolve()
    return common.parent


def facts_candidates(repo: Path = REPO) -> list[Path]:
    """Where the facts file may be, in order: $AGENTD_SHARED_DIR, <repo>/../shared, <main>/../shared."""
    out: list[Path] = []
    env = os.environ.get("AGENTD_SHARED_DIR")
    if env:
        out.append(Path(env) / "spec" / "agent-proto-facts.json")
    out.append(repo.parent / FACTS_RELATIVE)
    main = _main_checkout(repo)
    if main is not None:
        out.append(main.parent / FACTS_RELATIVE)
    return out


def load_facts(candidates: list[Path] | None = None) -> dict[str, Any]:
    """Load the facts; a missing file is a failure (never a skip): the check is the point."""
    if candidates is None:
        candidates = facts_candidates()
    for path in candidates:
        if path.is_file():
            facts: dict[str, Any] = json.loads(path.read_text())
            return facts
    tried = "\n  ".join(str(p) for p in candidates)
    pytest.fail(
        "agent-proto-facts.json not found; the descriptor check cannot run without it.\n"
        f"Tried:\n  {tried}\n"
        "Check out the shared/ directory beside the repository (or set AGENTD_SHARED_DIR).",
        pytrace=False,
    )


# ----------------------------------------------------------------------------------------------
# Indexing the compiled descriptors (FileDescriptorProto form: the same vocabulary as the facts)
# ----------------------------------------------------------------------------------------------


def compiled_files() -> list[descriptor_pb2.FileDescriptorProto]:
    """FileDescriptorProtos of the two generated modules, as the runtime loaded them."""
    files = []
    for module in (tailnet_pb2, agent_pb2):
        fdp = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(fdp)
        files.append(fdp)
    return files


@attrs.frozen
class Index:
    """Messages, enums and services of some files, by full name (no leading dot)."""

    messages: Mapping[str, descriptor_pb2.DescriptorProto]
    enums: Mapping[str, descriptor_pb2.EnumDescriptorProto]
    services: Mapping[str, descriptor_pb2.ServiceDescriptorProto]


def _walk(
    prefix: str, message: descriptor_pb2.DescriptorProto
) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto | descriptor_pb2.EnumDescriptorProto]]:
    name = f"{prefix}.{message.name}"
    yield name, message
    for enum in message.enum_type:
        yield f"{name}.{enum.name}", enum
    for nested in message.nested_type:
        yield from _walk(name, nested)


def build_index(files: list[descriptor_pb2.FileDescriptorProto]) -> Index:
    messages: dict[str, descriptor_pb2.DescriptorProto] = {}
    enums: dict[str, descriptor_pb2.EnumDescriptorProto] = {}
    services: dict[str, descriptor_pb2.ServiceDescriptorProto] = {}
    for fdp in files:
        for enum in fdp.enum_type:
            enums[f"{fdp.package}.{enum.name}"] = enum
        for top in fdp.message_type:
            for name, item in _walk(fdp.package, top):
                if isinstance(item, descriptor_pb2.DescriptorProto):
                    messages[name] = item
                else:
                    enums[name] = item
        for service in fdp.service:
            services[f"{fdp.package}.{service.name}"] = service
    return Index(messages=messages, enums=enums, services=services)


# ----------------------------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------------------------


@attrs.frozen
class Report:
    """What was compared and every disagreement found."""

    problems: list[str]
    messages: int
    fields: int
    map_entries: int
    enums: int
    enum_values: int
    services: int
    methods: int

    def summary(self) -> str:
        return (
            f"{self.messages} messages ({self.map_entries} map entries), {self.fields} fields, "
            f"{self.enums} enums ({self.enum_values} values), {self.services} services "
            f"({self.methods} methods): {len(self.problems)} problems"
        )


def _field_facts(message: descriptor_pb2.DescriptorProto, field: FDP) -> dict[str, Any]:
    """One compiled field in the facts file's vocabulary."""
    oneof = ""
    if field.HasField("oneof_index") and not field.proto3_optional:
        oneof = message.oneof_decl[field.oneof_index].name
    return {
        "number": field.number,
        "type": FDP.Type.Name(field.type),
        "type_name": field.type_name.removeprefix("."),
        "label": FDP.Label.Name(field.label),
        "proto3_optional": field.proto3_optional,
        "oneof": oneof,
    }


def _is_map_entry_fact(name: str, fields: Mapping[str, Any]) -> bool:
    """The facts list map<K,V> as a synthetic nested <Name>Entry message with key = 1, value = 2."""
    return (
        name.endswith("Entry")
        and set(fields) == {"key", "value"}
        and fields["key"]["number"] == 1
        and fields["value"]["number"] == 2
    )


def check(facts: Mapping[str, Any], files: list[descriptor_pb2.FileDescriptorProto]) -> Report:
    """Compare facts against compiled descriptors; never stops at the first problem."""
    index = build_index(files)
    problems: list[str] = []
    n_messages = n_fields = n_maps = n_enums = n_values = n_services = n_methods = 0

    map_entry_names = set()
    for msg_name, fields in facts.items():
        if msg_name.startswith("__"):
            continue
        if _is_map_entry_fact(msg_name, fields):
            map_entry_names.add(msg_name)

    for msg_name, fields in sorted(facts.items()):
        if msg_name.startswith("__"):
            continue
        n_messages += 1
        message = index.messages.get(msg_name)
        if message is None:
            problems.append(f"{msg_name}: message missing")
            continue
        is_map = message.options.map_entry
        if msg_name in map_entry_names:
            n_maps += 1
            if not is_map:
                problems.append(f"{msg_name}: expected a map entry (map<K,V> field), got a plain message")
        elif is_map:
            problems.append(f"{msg_name}: expected a plain message, got a map entry")
        compiled = {f.name: f for f in message.field}
        for field_name, want in fields.items():
            n_fields += 1
            where = f"{msg_name}.{field_name}"
            field = compiled.get(field_name)
            if field is None:
                problems.append(f"{where}: field missing (expected number {want['number']})")
                continue
            got = _field_facts(message, field)
            for key in ("number", "type", "type_name", "label", "proto3_optional", "oneof"):
                if got[key] != want[key]:
                    problems.append(f"{where}: {key} expected {want[key]!r}, got {got[key]!r}")

    for enum_name, values in sorted(facts.get("__enums__", {}).items()):
        n_enums += 1
        enum = index.enums.get(enum_name)
        if enum is None:
            problems.append(f"{enum_name}: enum missing")
            continue
        compiled_values = {v.name: v.number for v in enum.value}
        for value_name, number in values.items():
            n_values += 1
            if value_name not in compiled_values:
                problems.append(f"{enum_name}.{value_name}: enum value missing (expected {number})")
            elif compiled_values[value_name] != number:
                problems.append(
                    f"{enum_name}.{value_name}: number expected {number}, got {compiled_values[value_name]}"
                )

    for service_name, methods in sorted(facts.get("__services__", {}).items()):
        n_services += 1
        service = index.services.get(service_name)
        if service is None:
            problems.append(f"{service_name}: service missing")
            continue
        compiled_methods = {m.name: m for m in service.method}
        for method_name, want in methods.items():
            n_methods += 1
            where = f"/{service_name}/{method_name}"
            method = compiled_methods.get(method_name)
            if method is None:
                problems.append(f"{where}: method missing")
                continue
            got = {
                "input": method.input_type.removeprefix("."),
                "output": method.output_type.removeprefix("."),
                "client_streaming": method.client_streaming,
                "server_streaming": method.server_streaming,
            }
            for key in ("input", "output", "client_streaming", "server_streaming"):
                if got[key] != want[key]:
                    problems.append(f"{where}: {key} expected {want[key]!r}, got {got[key]!r}")

    return Report(
        problems=problems,
        messages=n_messages,
        fields=n_fields,
        map_entries=n_maps,
        enums=n_enums,
        enum_values=n_values,
        services=n_services,
        methods=n_methods,
    )


def assert_clean(report: Report) -> None:
    if report.problems:
        listing = "\n  ".join(report.problems)
        pytest.fail(
            f"compiled descriptors disagree with agent-proto-facts.json ({report.summary()}):\n  {listing}",
            pytrace=False,
        )


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def facts() -> dict[str, Any]:
    return load_facts()


def test_compiled_descriptors_match_facts(facts: dict[str, Any]) -> None:
    report = check(facts, compiled_files())
    assert_clean(report)
    # The facts really were compared, not an empty file: API 2.10 has 24 RPCs over two services.
    assert report.services == 2
    assert report.methods == 24
    assert report.messages > 100
    assert report.enums > 20


def test_facts_file_missing_is_a_clear_failure(tmp_path: Path) -> None:
    missing = tmp_path / FACTS_RELATIVE
    with pytest.raises(pytest.fail.Exception, match=r"agent-proto-facts\.json not found") as failure:
        load_facts([missing])
    assert str(missing) in str(failure.value)


def test_facts_found_beside_repo_and_beside_main_checkout(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    clone.mkdir()
    assert facts_candidates(clone)[-1] == tmp_path / FACTS_RELATIVE

    main = tmp_path / "main"
    worktree = tmp_path / "wt" / "proto"
    gitdir = main / ".git" / "worktrees" / "proto"
    gitdir.mkdir(parents=True)
    (gitdir / "commondir").write_text("../..\n")
    worktree.mkdir(parents=True)
    (worktree / ".git").write_text(f"gitdir: {gitdir}\n")
    assert tmp_path / FACTS_RELATIVE in facts_candidates(worktree)


def _mutations(facts: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(description, mutated facts, text the report must contain) — one per kind of fact."""

    def mutate(path: list[str], value: Any) -> dict[str, Any]:
        out = copy.deepcopy(facts)
        node = out
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return out

    m = "coder.agent.v2.BatchUpdateMetadataRequest"
    yield "field number", mutate([m, "metadata", "number"], 1), f"{m}.metadata: number expected 1, got 2"
    m = "coder.agent.v2.Manifest"
    yield "scalar type", mutate([m, "agent_name", "type"], "TYPE_BYTES"), f"{m}.agent_name: type expected"
    yield "label", mutate([m, "scripts", "label"], "LABEL_OPTIONAL"), f"{m}.scripts: label expected"
    yield (
        "proto3 optional",
        mutate([m, "directory", "proto3_optional"], True),
        f"{m}.directory: proto3_optional expected True, got False",
    )
    yield (
        "message type name",
        mutate([m, "derp_map", "type_name"], "coder.tailnet.v2.Node"),
        f"{m}.derp_map: type_name expected 'coder.tailnet.v2.Node'",
    )
    m = "coder.agent.v2.BoundaryLog"
    yield "oneof membership", mutate([m, "allowed", "oneof"], "resource"), f"{m}.allowed: oneof expected"
    yield (
        "missing field",
        mutate([m, "verdict"], dict(facts[m]["allowed"], number=9)),
        f"{m}.verdict: field missing",
    )
    yield (
        "missing message",
        mutate(["coder.agent.v2.Nope"], {}),
        "coder.agent.v2.Nope: message missing",
    )
    yield (
        "map entry",
        mutate(
            ["coder.agent.v2.Stats.Metric.LabelsEntry"],
            {
                "key": facts["coder.agent.v2.Stats.Metric.Label"]["name"] | {"number": 1},
                "value": facts["coder.agent.v2.Stats.Metric.Label"]["value"] | {"number": 2},
            },
        ),
        "coder.agent.v2.Stats.Metric.LabelsEntry: message missing",
    )
    e = "coder.agent.v2.CreateSubAgentRequest.App.SharingLevel"
    yield "enum value", mutate(["__enums__", e, "OWNER"], 1), f"{e}.OWNER: number expected 1, got 0"
    yield "missing enum value", mutate(["__enums__", e, "NOBODY"], 9), f"{e}.NOBODY: enum value missing"
    yield (
        "missing enum",
        mutate(["__enums__", "coder.agent.v2.Nope"], {"A": 0}),
        "coder.agent.v2.Nope: enum missing",
    )
    yield (
        "missing service",
        mutate(["__services__", "coder.agent.v2.Nope"], {}),
        "coder.agent.v2.Nope: service missing",
    )
    s = "coder.tailnet.v2.Tailnet"
    yield (
        "server streaming",
        mutate(["__services__", s, "StreamDERPMaps", "server_streaming"], False),
        f"/{s}/StreamDERPMaps: server_streaming expected False, got True",
    )
    yield (
        "client streaming",
        mutate(["__services__", s, "Coordinate", "client_streaming"], False),
        f"/{s}/Coordinate: client_streaming expected False, got True",
    )
    a = "coder.agent.v2.Agent"
    yield (
        "method output",
        mutate(["__services__", a, "ReportConnection", "output"], "coder.agent.v2.Lifecycle"),
        f"/{a}/ReportConnection: output expected 'coder.agent.v2.Lifecycle', got 'google.protobuf.Empty'",
    )
    yield (
        "missing method",
        mutate(["__services__", a, "Frobnicate"], facts["__services__"][a]["GetManifest"]),
        f"/{a}/Frobnicate: method missing",
    )


def test_check_reports_every_kind_of_mismatch(facts: dict[str, Any]) -> None:
    files = compiled_files()
    for description, mutated, expected in _mutations(facts):
        report = check(mutated, files)
        assert report.problems, f"mutation not detected: {description}"
        assert any(expected in p for p in report.problems), (description, report.problems)


def test_check_lists_all_problems_at_once(facts: dict[str, Any]) -> None:
    mutated = copy.deepcopy(facts)
    mutated["coder.agent.v2.Manifest"]["agent_id"]["number"] = 99
    mutated["__enums__"]["coder.agent.v2.AppHealth"]["HEALTHY"] = 7
    mutated["__services__"]["coder.agent.v2.Agent"]["GetManifest"]["server_streaming"] = True
    report = check(mutated, compiled_files())
    assert len(report.problems) == 3, report.problems
    with pytest.raises(pytest.fail.Exception) as failure:
        assert_clean(report)
    text = str(failure.value)
    for problem in report.problems:
        assert problem in text


def test_check_catches_mutated_descriptors(facts: dict[str, Any]) -> None:
    """The other direction: facts intact, compiled side wrong (as a bad .proto edit would be)."""
    tailnet_fdp, agent_fdp = compiled_files()
    manifest = next(m for m in agent_fdp.message_type if m.name == "Manifest")
    parent_id = next(f for f in manifest.field if f.name == "parent_id")
    parent_id.proto3_optional = False
    env_entry = next(n for n in manifest.nested_type if n.name == "EnvironmentVariablesEntry")
    env_entry.options.map_entry = False
    service = agent_fdp.service[0]
    service.method[0].input_type = ".coder.agent.v2.GetServiceBannerRequest"
    derp = next(m for m in tailnet_fdp.message_type if m.name == "DERPMap")
    del derp.field[:]

    problems = check(facts, [tailnet_fdp, agent_fdp]).problems
    expected = [
        "coder.agent.v2.Manifest.parent_id: proto3_optional expected True, got False",
        "coder.agent.v2.Manifest.EnvironmentVariablesEntry: expected a map entry",
        "/coder.agent.v2.Agent/GetManifest: input expected 'coder.agent.v2.GetManifestRequest'",
        "coder.tailnet.v2.DERPMap.home_params: field missing",
        "coder.tailnet.v2.DERPMap.regions: field missing",
    ]
    for text in expected:
        assert any(text in p for p in problems), (text, problems)


def test_extra_fields_values_and_methods_are_allowed(facts: dict[str, Any]) -> None:
    tailnet_fdp, agent_fdp = compiled_files()
    stats = next(m for m in agent_fdp.message_type if m.name == "Stats")
    stats.field.add(name="session_counts_extra", number=99, type=FDP.TYPE_INT64, label=FDP.LABEL_OPTIONAL)
    agent_fdp.enum_type[0].value.add(name="APP_HEALTH_EXTRA", number=42)
    agent_fdp.service[0].method.add(
        name="Extra", input_type=".google.protobuf.Empty", output_type=".google.protobuf.Empty"
    )
    assert check(facts, [tailnet_fdp, agent_fdp]).problems == []


# ----------------------------------------------------------------------------------------------
# The helpers in agentd.proto and a few wire spot checks of the odd numbering
# ----------------------------------------------------------------------------------------------


def test_services_and_rpc_paths(facts: dict[str, Any]) -> None:
    assert AGENT_SERVICE.full_name == "coder.agent.v2.Agent"
    assert TAILNET_SERVICE.full_name == "coder.tailnet.v2.Tailnet"
    paths = {rpc_path(m) for m in (*AGENT_SERVICE.methods, *TAILNET_SERVICE.methods)}
    expected = {
        f"/{service}/{method}" for service, methods in facts["__services__"].items() for method in methods
    }
    assert paths == expected
    assert rpc_path(AGENT_SERVICE.methods_by_name["GetManifest"]) == "/coder.agent.v2.Agent/GetManifest"


def test_batch_update_metadata_uses_field_two_on_the_wire() -> None:
    request = agent_pb2.BatchUpdateMetadataRequest(metadata=[agent_pb2.Metadata(key="k")])
    # tag (2 << 3 | wire type 2) = 0x12, length 3, then Metadata{1: "k"}.
    assert request.SerializeToString() == b"\x12\x03\x0a\x01k"


def test_sharing_level_enums_number_differently() -> None:
    app = agent_pb2.CreateSubAgentRequest.App(share=agent_pb2.CreateSubAgentRequest.App.OWNER)
    assert app.HasField("share")  # proto3 optional: an explicit zero is still present
    assert app.SerializeToString() == b"\x58\x00"  # tag (11 << 3 | varint) = 0x58, value 0
    assert agent_pb2.WorkspaceApp.OWNER == 1
    assert agent_pb2.CreateSubAgentRequest.App.OWNER == 0


def test_optional_bytes_presence_round_trips() -> None:
    manifest = agent_pb2.Manifest(parent_id=b"")
    assert manifest.HasField("parent_id")
    decoded = agent_pb2.Manifest.FromString(manifest.SerializeToString())
    assert decoded.HasField("parent_id")
    assert not agent_pb2.Manifest().HasField("parent_id")


def test_manifest_embeds_tailnet_derp_map() -> None:
    manifest = agent_pb2.Manifest()
    manifest.derp_map.home_params.region_score[1] = 1.5
    manifest.derp_map.regions[7].nodes.add(name="n", host_name="h")
    decoded = agent_pb2.Manifest.FromString(manifest.SerializeToString())
    assert isinstance(decoded.derp_map, tailnet_pb2.DERPMap)
    assert decoded.derp_map.regions[7].nodes[0].host_name == "h"
    assert decoded.derp_map.home_params.region_score[1] == 1.5
