"""Imports point one way (docs/architecture.md): no module imports a layer above its own, no
modules import each other in a circle, and the CLI loads a subcommand's module only when it runs.

The import graph is read from the source with `ast` (every `import`, including those inside
functions and under `if TYPE_CHECKING:`), so a dependency counts even when it is deferred.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from conftest import REPO

from greenroute.gateway import cli

FOLDERS = ("backends", "routers", "evals", "gateway")

# Each layer and the layers it may import besides its own, lowest first.
# `evals` (the offline harness) and `gateway` (serving) are siblings: neither imports the other.
ALLOWED: dict[str, frozenset[str]] = {
    "backends": frozenset(),
    "routers": frozenset({"backends"}),
    "config": frozenset({"backends", "routers"}),
    "ledger": frozenset({"backends"}),
    "evals": frozenset({"backends", "routers", "config"}),
    "gateway": frozenset({"backends", "routers", "config", "ledger"}),
    # The admin commands read the ledger and, for energy labels, the harness's outcome tables.
    "admin": frozenset({"backends", "routers", "config", "ledger", "evals"}),
    "cli": frozenset({"backends", "routers", "config", "ledger", "evals", "gateway", "admin"}),
}


# greenroute.gateway modules of the admin commands
ADMIN = ("report", "device_totals", "labels", "agent", "keys_command")
# greenroute.gateway modules of the config layer: the config, and the grid-intensity series its
# [energy] grid_intensity file holds (read by the app and by `report`)
CONFIG = ("config", "carbon")


def layer_of(module: str) -> str:
    """The layer of a module of the namespace, e.g. greenroute.gateway.ledger.store -> ledger."""
    parts = module.split(".")
    if parts[1] == "gateway" and len(parts) > 2 and parts[2] in CONFIG:
        return "config"
    if parts[1] == "gateway" and len(parts) > 2 and parts[2] in ("cli", "ledger"):
        return parts[2]
    if parts[1] == "gateway" and len(parts) > 2 and parts[2] in ADMIN:
        return "admin"
    return parts[1]


def module_files(root: Path = REPO) -> dict[str, Path]:
    """greenroute.* module name -> source file, for every .py file under the package folders."""
    modules = {}
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(("greenroute", *parts))] = path
    return modules


def imports_of(module: str, path: Path, known: Iterable[str]) -> set[str]:
    """The namespace modules `module` imports, resolved to the deepest module that exists."""
    names = set(known)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from a.b import c`: module a.b.c if there is one, else a.b (c is a name in it)
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if not target.startswith("greenroute."):
                continue
            while target not in names and "." in target:
                target = target.rpartition(".")[0]
            if target in names and target != module:
                found.add(target)
    return found


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    files = module_files(root)
    return {module: imports_of(module, path, files) for module, path in files.items()}


def upward_imports(graph: Mapping[str, Iterable[str]]) -> list[str]:
    """Every import of a layer the importer's layer may not use."""
    return sorted(f"{importer} ({layer_of(importer)}) imports {imported} ({layer_of(imported)})"
                  for importer, targets in graph.items() for imported in targets
                  if layer_of(imported) != layer_of(importer)
                  and layer_of(imported) not in ALLOWED[layer_of(importer)])


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The import cycles: strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_folder_module_is_seen() -> None:
    graph = import_graph()
    assert {"greenroute.gateway.cli", "greenroute.gateway.config", "greenroute.backends.base",
            "greenroute.gateway.ledger.store", "greenroute.evals.collect"} <= graph.keys()
    assert {layer_of(m) for m in graph} == set(ALLOWED)
    # Function-local imports count: the CLI's serve handler builds the app.
    assert "greenroute.gateway.app" in graph["greenroute.gateway.cli"]


def test_no_module_imports_a_layer_above_its_own() -> None:
    found = upward_imports(import_graph())
    assert not found, "upward imports:\n" + "\n".join(found)


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checks_catch_an_upward_import_and_a_cycle() -> None:
    graph = {
        "greenroute.backends.registry": {"greenroute.gateway.config"},  # upward
        "greenroute.gateway.config": {"greenroute.backends.registry"},
        "greenroute.routers.a": {"greenroute.routers.b"},
        "greenroute.routers.b": {"greenroute.routers.c"},
        "greenroute.routers.c": {"greenroute.routers.a"},
        "greenroute.gateway.app": {"greenroute.evals.collect"},  # a sibling, not below
    }
    assert upward_imports(graph) == [
        "greenroute.backends.registry (backends) imports greenroute.gateway.config (config)",
        "greenroute.gateway.app (gateway) imports greenroute.evals.collect (evals)",
    ]
    assert cycles(graph) == [
        ["greenroute.backends.registry", "greenroute.gateway.config"],
        ["greenroute.routers.a", "greenroute.routers.b", "greenroute.routers.c"],
    ]


def test_imports_are_resolved_from_source(tmp_path: Path) -> None:
    for folder in FOLDERS:
        (tmp_path / folder).mkdir()
    (tmp_path / "backends" / "__init__.py").write_text("")
    (tmp_path / "backends" / "weights.py").write_text("")
    (tmp_path / "gateway" / "config.py").write_text("")
    (tmp_path / "backends" / "registry.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from greenroute.backends import weights\n"
        "if TYPE_CHECKING:\n"
        "    from greenroute.gateway.config import X\n"
        "def f():\n"
        "    import greenroute.routers.nowhere\n"
        "    from . import weights as w, base\n"
        "    from .energy.meter import Meter\n")
    (tmp_path / "backends" / "base.py").write_text("")
    (tmp_path / "backends" / "energy").mkdir()
    (tmp_path / "backends" / "energy" / "meter.py").write_text("")
    assert import_graph(tmp_path)["greenroute.backends.registry"] == {
        "greenroute.backends.weights", "greenroute.backends.base",
        "greenroute.backends.energy.meter", "greenroute.gateway.config"}


# -- the CLI loads subcommand modules lazily ---------------------------------------------------

def _loaded_by(argv: list[str]) -> set[str]:
    code = ("import sys\nfrom greenroute.gateway import cli\n"
            f"try:\n    cli.main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('\\n'.join(sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=60)
    return set(result.stdout.split())


def test_serve_help_loads_no_harness_plots_or_training() -> None:
    loaded = _loaded_by(["serve", "--help"])
    assert "greenroute.gateway.cli" in loaded
    heavy = sorted(m for m in loaded if m.startswith(("greenroute.evals", "matplotlib",
                                                      "greenroute.routers", "torch", "numpy")))
    assert heavy == []


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    (action,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(action.choices)


def test_the_command_table_names_every_registered_subcommand() -> None:
    # No command (or `--help`): every subcommand module registers its parsers.
    assert _subcommands(cli.build_parser([])) == {*cli.OWN_COMMANDS, *cli.COMMANDS}
    for command, module in cli.COMMANDS.items():
        assert cli.registering_modules([command, "--help"]) == [module]
        assert command in _subcommands(cli.build_parser([command]))
    assert cli.registering_modules(["serve", "--port", "1"]) == []
