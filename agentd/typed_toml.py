"""TOML files as typed objects: msgspec structs, strict, with errors that name the field's path.

The daemon's config file, its ``[banners]`` table and the ``agentd admin create-workspace`` file are
declared as :class:`msgspec.Struct` classes (``forbid_unknown_fields=True``; ranges, lengths,
patterns and enums as :class:`msgspec.Meta` constraints or ``Literal`` types; cross-field rules in
``__post_init__``). :func:`convert` turns a parsed table into such an object; a failure becomes a
:class:`Problem` that names the path (``agents[0].apps[1].slug``) and says in the file's own terms
what the value must be and what it was, instead of msgspec's JSON vocabulary.

A field can word its expectation itself: ``Meta(extra={"expect": "letters, digits and inner
hyphens"})`` (see :func:`expect`). ``__post_init__`` raises ``ValueError("needs a url or a command")``
for the struct's own path, or ``ValueError("apps[1].slug: duplicate value 'x'")`` for a path inside it.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec
from msgspec import inspect as mi

__all__ = ["Problem", "convert", "expect", "read_toml"]

T = TypeVar("T")

#: msgspec's message and path: "Expected `int`, got `str` - at `$.agents[0].name`".
_AT = re.compile(r"^(?P<what>.*) - at `\$(?P<path>.*)`$", re.DOTALL)
_SEGMENT = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<key>.*)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<key>.*)`$")
#: A ``__post_init__`` message for a path inside the struct: "apps[1].slug: duplicate value 'x'".
_RELATIVE = re.compile(r"^(?P<sub>[A-Za-z_][\w]*(?:\[\d+\]|\.[A-Za-z_]\w*)*): (?P<text>.+)$", re.DOTALL)
#: msgspec's own wording, never a ``__post_init__`` message.
_MSGSPEC_WORDS = ("Expected ", "Object ", "Invalid ")


def expect(text: str, **constraints: Any) -> msgspec.Meta:
    """Constraints plus the words an error uses for what the value must be ("must be <text>")."""
    return msgspec.Meta(**constraints, extra={"expect": text})


class Problem(ValueError):
    """Why a table does not fit its struct: where (a dotted path, "" for the table itself), and what.

    ``kind``: "unknown" (a key the struct does not have; ``allowed`` lists those it has), "missing"
    (a required key is absent) or "invalid" (a value of the wrong type, out of range, or a rule of the
    struct's ``__post_init__``).
    """

    def __init__(
        self,
        path: str,
        text: str,
        kind: Literal["unknown", "missing", "invalid"] = "invalid",
        allowed: tuple[str, ...] = (),
    ) -> None:
        super().__init__(f"{path}: {text}" if path else text)
        self.path = path
        self.text = text
        self.kind = kind
        self.allowed = allowed


def convert(raw: Any, type_: type[T], *, root: str = "") -> T:
    """``raw`` (a parsed TOML table) as a ``type_``; raises :class:`Problem` (paths start at ``root``)."""
    try:
        return msgspec.convert(raw, type_)
    except msgspec.ValidationError as exc:
        raise explain(str(exc), raw, type_, root=root) from None


def read_toml(path: Path, error: Callable[[str], Exception]) -> dict[str, Any]:
    """Parse a TOML file; a missing, unreadable or malformed file is ``error("<path>: <why>")``."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except OSError as e:
        raise error(f"{path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise error(f"{path}: invalid TOML: {e}") from None


# ---------------------------------------------------------------------------------------------
# From msgspec's message to a Problem.

_MISSING_VALUE = object()


def explain(message: str, raw: Any, type_: type[Any], *, root: str = "") -> Problem:
    """The :class:`Problem` for one msgspec validation message about ``raw`` converted to ``type_``."""
    match = _AT.match(message)
    what, steps = (match["what"], _steps(match["path"])) if match else (message, [])
    node: mi.Type = mi.type_info(type_)
    value: Any = raw
    path = root
    for step in steps:
        if step == "...":  # a value inside a table of values: the table is the place to name
            break
        node, value = _child(node, value, step)
        path = f"{path}[{step}]" if isinstance(step, int) else _join(path, step)
    if unknown := _UNKNOWN.match(what):
        struct = _struct(node)
        allowed = tuple(f.encode_name for f in struct.fields) if struct is not None else ()
        return Problem(
            _join(path, unknown["key"]),
            f"unknown field (allowed: {', '.join(allowed)})",
            "unknown",
            allowed,
        )
    if missing := _MISSING.match(what):
        return Problem(_join(path, missing["key"]), "required field is missing", "missing")
    if not what.startswith(_MSGSPEC_WORDS):  # a __post_init__ rule
        if relative := _RELATIVE.match(what):
            return Problem(_join(path, relative["sub"]), relative["text"])
        return Problem(path, what)
    got = "" if value is _MISSING_VALUE else f", got {_describe(value)}"
    return Problem(path, f"must be {_expectation(node)}{got}")


def _steps(path: str) -> list[str | int]:
    steps: list[str | int] = []
    for name, index in _SEGMENT.findall(path):
        if name:
            steps.append(name)
        else:
            steps.append(int(index) if index.isdigit() else index)
    return steps


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _unwrap(node: mi.Type) -> tuple[mi.Type, dict[str, Any]]:
    """The type under Metadata and ``X | None`` unions, with the ``extra`` of its Meta."""
    extra: dict[str, Any] = {}
    while True:
        if isinstance(node, mi.Metadata):
            extra = {**(node.extra or {}), **extra}
            node = node.type
        elif isinstance(node, mi.UnionType):
            members = [t for t in node.types if not isinstance(t, mi.NoneType)]
            if len(members) != 1:
                return node, extra
            node = members[0]
        else:
            return node, extra


def _struct(node: mi.Type) -> mi.StructType | None:
    inner, _ = _unwrap(node)
    return inner if isinstance(inner, mi.StructType) else None


def _child(node: mi.Type, value: Any, step: str | int) -> tuple[mi.Type, Any]:
    inner, _ = _unwrap(node)
    if isinstance(step, int):
        item: mi.Type = inner.item_type if isinstance(inner, mi.ListType | mi.VarTupleType) else mi.AnyType()
        ok = isinstance(value, list) and step < len(value)
        return item, value[step] if ok else _MISSING_VALUE
    field_type: mi.Type = mi.AnyType()
    if isinstance(inner, mi.StructType):
        for f in inner.fields:
            if f.encode_name == step:
                field_type = f.type
    ok = isinstance(value, dict) and step in value
    return field_type, value[step] if ok else _MISSING_VALUE


def _expectation(node: mi.Type) -> str:
    """What a value at ``node`` must be, in a TOML file's terms ("an integer in 0..100")."""
    inner, extra = _unwrap(node)
    if "expect" in extra:
        return str(extra["expect"])
    match inner:
        case mi.BoolType():
            return "true or false"
        case mi.IntType(ge=low, le=high):
            return "an integer" + (f" in {low}..{high}" if low is not None and high is not None else "")
        case mi.FloatType(ge=low, le=high):
            bounds = f" in {low:g}..{high:g}" if low is not None and high is not None else ""
            return "a number" + bounds
        case mi.StrType(max_length=max_length, pattern=pattern):
            text = "a string" if pattern is None else f"a string matching {pattern}"
            return text + (f" of at most {max_length} characters" if max_length is not None else "")
        case mi.LiteralType(values=values):
            return "one of " + ", ".join(str(v) for v in values)
        case mi.UUIDType():
            return "a UUID"
        case mi.StructType():
            return "a table"
        case mi.DictType(value_type=value_type):
            return "a table of strings" if isinstance(value_type, mi.StrType) else "a table"
        case mi.ListType(item_type=item) | mi.VarTupleType(item_type=item):
            if _struct(item) is not None:
                return "an array of tables"
            return f"an array of {_plural(_expectation(item))}"
    return "a different value"


def _plural(text: str) -> str:
    for article in ("an ", "a "):
        if text.startswith(article):
            head, _, rest = text[len(article) :].partition(" ")
            return f"{head}s" + (f" {rest}" if rest else "")
    return text


def _describe(value: Any) -> str:
    """A value as the file wrote it: true, 5, 2.5, inf, 'text', a table, an array."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:g}"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__
