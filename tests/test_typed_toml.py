"""agentd.typed_toml: msgspec structs for TOML files, and errors in the file's own paths and words."""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import pytest

from agentd.typed_toml import Problem, convert, expect, read_toml


class Check(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    url: str
    interval: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 5


class Item(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    slug: Annotated[str, expect("lower-case letters", pattern=r"^[a-z]+$")]
    level: Literal["low", "high"] = "low"
    ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.5
    enabled: bool = True
    token: uuid.UUID | None = None
    env: dict[str, str] = msgspec.field(default_factory=dict)
    tags: tuple[str, ...] = ()
    check: Check | None = None

    def __post_init__(self) -> None:
        if self.slug == "bad":
            raise ValueError("is reserved")
        if len(set(self.tags)) != len(self.tags):
            raise ValueError(f"tags[{len(self.tags) - 1}]: duplicate value {self.tags[-1]!r}")


class Top(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    items: tuple[Item, ...] = ()


def problem(raw: Any, *, root: str = "") -> Problem:
    with pytest.raises(Problem) as info:
        convert(raw, Top, root=root)
    return info.value


def test_a_valid_table_becomes_the_struct() -> None:
    top = convert({"items": [{"slug": "a", "ratio": 1, "check": {"url": "u"}}]}, Top)
    assert top == Top(items=(Item(slug="a", ratio=1.0, check=Check(url="u")),))


@pytest.mark.parametrize(
    ("raw", "path", "kind", "text"),
    [
        ({"itemz": []}, "itemz", "unknown", "unknown field (allowed: items)"),
        ({"items": [{"slug": "a", "x": 1}]}, "items[0].x", "unknown", "unknown field (allowed: slug, level,"),
        ({"items": [{}]}, "items[0].slug", "missing", "required field is missing"),
        ({"items": [{"slug": 5}]}, "items[0].slug", "invalid", "must be lower-case letters, got 5"),
        ({"items": [{"slug": "A"}]}, "items[0].slug", "invalid", "must be lower-case letters, got 'A'"),
        ({"items": [{"slug": "a", "level": "mid"}]}, "items[0].level", "invalid", "must be one of high, low"),
        (
            {"items": [{"slug": "a", "ratio": math.nan}]},
            "items[0].ratio",
            "invalid",
            "must be a number in 0..1, got nan",
        ),
        (
            {"items": [{"slug": "a", "ratio": True}]},
            "items[0].ratio",
            "invalid",
            "must be a number in 0..1, got true",
        ),
        (
            {"items": [{"slug": "a", "enabled": 1}]},
            "items[0].enabled",
            "invalid",
            "must be true or false, got 1",
        ),
        ({"items": [{"slug": "a", "token": "x"}]}, "items[0].token", "invalid", "must be a UUID, got 'x'"),
        (
            {"items": [{"slug": "a", "env": {"A": 1}}]},
            "items[0].env",
            "invalid",
            "must be a table of strings",
        ),
        ({"items": [{"slug": "a", "tags": [1]}]}, "items[0].tags[0]", "invalid", "must be a string, got 1"),
        ({"items": [{"slug": "a", "tags": "x"}]}, "items[0].tags", "invalid", "must be an array of strings"),
        ({"items": {"slug": "a"}}, "items", "invalid", "must be an array of tables, got a table"),
        ({"items": [{"slug": "a", "check": "x"}]}, "items[0].check", "invalid", "must be a table, got 'x'"),
        (
            {"items": [{"slug": "a", "check": {"url": "u", "interval": 0}}]},
            "items[0].check.interval",
            "invalid",
            "must be an integer in 1..3600, got 0",
        ),
        ({"items": [{"slug": "a"}, {"slug": "bad"}]}, "items[1]", "invalid", "is reserved"),
        (
            {"items": [{"slug": "a", "tags": ["x", "x"]}]},
            "items[0].tags[1]",
            "invalid",
            "duplicate value 'x'",
        ),
    ],
)
def test_problems_name_the_path(raw: Any, path: str, kind: str, text: str) -> None:
    found = problem(raw)
    assert (found.path, found.kind) == (path, kind)
    assert found.text.startswith(text), found.text
    assert str(found) == f"{path}: {found.text}"


def test_paths_start_at_the_root_given() -> None:
    assert problem({"items": [{}]}, root="section").path == "section.items[0].slug"
    assert problem({"itemz": 1}, root="section").allowed == ("items",)


def test_read_toml_names_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('a = "b"\n')
    assert read_toml(good, ValueError) == {"a": "b"}
    bad = tmp_path / "bad.toml"
    bad.write_text("a = [\n")
    with pytest.raises(ValueError, match=r"bad\.toml: invalid TOML"):
        read_toml(bad, ValueError)
    with pytest.raises(ValueError, match=r"absent\.toml: file not found"):
        read_toml(tmp_path / "absent.toml", ValueError)
