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


# ---- the drawing in the README -------------------------------------------------------------------

#: The groups the README's import graph draws (a module belongs to its longest matching prefix).
GROUPS: dict[str, tuple[str, ...]] = {
    "base": (
        "agentd.model",
        "agentd.clock",
        "agentd.channels",
        "agentd.logfmt",
        "agentd.shutdown",
        "agentd.typed_toml",
    ),
    "store": ("agentd.store",),
    "batchers": ("agentd.batchers",),
    "services": ("agentd.services",),
    "tailnet": ("agentd.tailnet",),
    "mux": ("agentd.mux",),
    "drpc": ("agentd.drpc", "agentd.proto"),
    "front": ("agentd.http", "agentd.handshake", "agentd.websocket"),
    "session": (
        "agentd.connection",
        "agentd.components",
        "agentd.monitor",
        "agentd.metrics",
        "agentd.server_metrics",
    ),
    "client": ("agentd.client", "agentd.agent"),
    "daemon": (
        "agentd.daemon",
        "agentd.workers",
        "agentd.cli",
        "agentd.__main__",
        "agentd.admin",
        "agentd.agents_cmd",
        "agentd.systemd",
        "agentd.config",
        "agentd.listeners",
        "agentd.testing",
    ),
}


def group_of(module: str) -> str | None:
    best: tuple[str, int] | None = None
    for group, prefixes in GROUPS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (
                best is None or len(prefix) > best[1]
            ):
                best = (group, len(prefix))
    return best[0] if best else None


def group_edges() -> list[tuple[str, str]]:
    """Every (importer group, imported group) pair of agentd's modules."""
    edges: set[tuple[str, str]] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        if module == "agentd":
            continue
        source = group_of(module)
        assert source is not None, f"{module} is in no group of the drawing"
        for name in imports_of(path.read_text(), module, is_package=path.name == "__init__.py"):
            target = group_of(name) if name.startswith("agentd.") else None
            if target is not None and target != source:
                edges.add((source, target))
    return sorted(edges)


def mermaid() -> str:
    lines = ["```mermaid", "graph BT"]
    lines += [f"  {source} --> {target}" for source, target in group_edges()]
    lines.append("```")
    return "\n".join(lines)


def test_the_readme_draws_the_import_graph_as_it_is() -> None:
    """README's drawing is generated (`python -m tests.test_layers`) and must match the code."""
    readme = (PACKAGE.parent / "README.md").read_text()
    start, end = "<!-- import-graph: python -m tests.test_layers -->\n", "\n<!-- /import-graph -->"
    assert start in readme and end in readme
    drawn = readme.split(start, 1)[1].split(end, 1)[0]
    assert drawn == mermaid(), "README's import graph is stale: python -m tests.test_layers"
    edges = group_edges()
    assert ("store", "services") not in edges and ("batchers", "services") not in edges


if __name__ == "__main__":
    print(mermaid())
