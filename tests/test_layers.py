"""Layers point one way (DESIGN.md "Layers"): what each low layer of agentd may not import.

Every ``import``/``from ... import`` of a module is read from its AST (function-local and
``TYPE_CHECKING`` imports included: a type-only arrow is still an arrow in the drawing).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "agentd"

#: layer (a module or package of agentd) -> the agentd modules it must not import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    # the shared records and the clock: below everything
    "agentd.model": ("agentd",),
    "agentd.clock": ("agentd",),
    "agentd.channels": ("agentd",),
    # the store serves the layers above it and knows none of them
    "agentd.store": (
        "agentd.services",
        "agentd.batchers",
        "agentd.connection",
        "agentd.components",
        "agentd.monitor",
        "agentd.daemon",
        "agentd.testing",
    ),
    # process-wide batchers sit between the store and the per-connection services
    "agentd.batchers": (
        "agentd.services",
        "agentd.connection",
        "agentd.components",
        "agentd.daemon",
        "agentd.testing",
    ),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Every module `source` (the text of `module`) imports, relative imports resolved."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            # `from agentd import services` imports agentd.services
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def violations(layer: str) -> list[str]:
    root = PACKAGE.parent.joinpath(*layer.split("."))
    paths = sorted(root.rglob("*.py")) if root.is_dir() else [root.with_suffix(".py")]
    out: list[str] = []
    for path in paths:
        module = module_name(path)
        imported = imports_of(path.read_text(), module, is_package=path.name == "__init__.py")
        for name in sorted(imported):
            for forbidden in FORBIDDEN[layer]:
                if (name == forbidden or name.startswith(forbidden + ".")) and not _within(name, layer):
                    out.append(f"{module} imports {name}")
    return out


def _within(name: str, layer: str) -> bool:
    return name == layer or name.startswith(layer + ".")


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_down(layer: str) -> None:
    assert violations(layer) == []


def test_the_check_sees_every_kind_of_import() -> None:
    """The checker itself: absolute, relative, type-only and function-local imports all count."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "import agentd.services.events\n"
        "from agentd.services.base import AgentIdentity\n"
        "from .. import services\n"
        "if TYPE_CHECKING:\n"
        "    from agentd.connection import AgentConnection\n"
        "def f():\n"
        "    from agentd.daemon import Daemon\n"
    )
    found = imports_of(source, "agentd.store.stats")
    assert {
        "agentd.services.events",
        "agentd.services.base",
        "agentd.services",
        "agentd.connection",
        "agentd.daemon",
    } <= found
