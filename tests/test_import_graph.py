"""The package's import graph: every module imports, no two modules import each other (directly
or around a cycle), no module imports another module's private name, and imports point forward
through the layers of docs/design.md, "Layout".

Every import statement counts, also those inside functions and under ``TYPE_CHECKING``: a lazy
import only hides a cycle."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import colabx

#: Layers, earliest first; a module may import from its own layer and earlier ones. The twins
#: come before the ops (an op falls back to its twin), the ops before the data (preprocessing
#: computes distance maps), inference before the trainer (which validates and evaluates with it).
#: Modules not listed (cli, bench, compat, the package root and the deprecated aliases) sit
#: above every layer.
LAYERS = ["colabx.twins", "colabx.ops", "colabx.data", "colabx.models", "colabx.method",
          "colabx.inference", "colabx.viz", "colabx.train"]
#: Shared helpers below every layer.
BASE = ["colabx._C", "colabx._backend", "colabx._io", "colabx._moved", "colabx._precision",
        "colabx._threads", "colabx.checkpoint", "colabx.device"]


def _modules() -> dict[str, Path]:
    """Every module of the package (``__init__`` for packages) with its source file."""
    root = Path(colabx.__file__).parent
    out = {"colabx": root / "__init__.py"}
    for info in pkgutil.walk_packages([str(root)], prefix="colabx."):
        rel = Path(*info.name.split(".")[1:])
        path = root / rel / "__init__.py" if info.ispkg else root / rel.with_suffix(".py")
        if path.is_file():
            out[info.name] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    is_pkg = MODULES[module].name == "__init__.py"
    base = parts if is_pkg else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` of every colabx import in ``module``;
    ``from pkg import sub`` of a submodule counts as an import of ``pkg.sub``."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names
                    if a.name.split(".")[0] == "colabx"]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if target.split(".")[0] != "colabx":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in MODULES or sub == "colabx._C":
                    out.append((sub, None, node.lineno))
                else:
                    out.append((target, a.name, node.lineno))
    return out


def _edges() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"colabx.__main__"}))
def test_module_imports(name):
    importlib.import_module(name)


def test_no_import_cycles():
    """A package's ``__init__`` may import its submodules; a submodule importing the package
    back (``from colabx.models import UNet`` inside ``colabx.models.plan``) closes a cycle."""
    edges = _edges()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_imports_across_modules():
    """``from x import _y`` takes a private name of module x; allowed only for private
    submodules of a package the importer belongs to (``from colabx import _C``)."""
    bad = []
    for m in sorted(MODULES):
        for target, name, line in _imports(m):
            if name is not None and name.startswith("_") and target != m:
                bad.append(f"{m}:{line}: from {target} import {name}")
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def _layer(m: str) -> int | None:
    if any(m == b or m.startswith(b + ".") for b in BASE):
        return -1
    for i, layer in enumerate(LAYERS):
        if m == layer or m.startswith(layer + "."):
            return i
    return None


def test_imports_point_forward():
    bad = []
    for m in sorted(MODULES):
        lm = _layer(m)
        if lm is None:
            continue
        for target, _, line in _imports(m):
            lt = _layer(target)
            if lt is None or lt > lm:
                bad.append(f"{m}:{line} imports {target}")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)
