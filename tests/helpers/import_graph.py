"""The import graph of the flagcx package, read from the source (no imports run): its cycles and its layer order.

Every ``import`` and ``from ... import`` counts, at module level or inside a function
(a deferred import hides a circle, it does not remove it), except those under
``if TYPE_CHECKING:``. :data:`LAYERS` lists the packages from the top down; a module may
import its own layer and the layers below it, never one above.
``python -c "from tests.helpers.import_graph import main; main()"`` prints the cycles and
the imports against the order, and exits 1 when there is one.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("applications", ("flagcx", "flagcx._autoload", "flagcx.launch", "flagcx.bench", "flagcx.models", "flagcx.integrations")),
    ("frontends", ("flagcx.frontends",)),
    ("core", ("flagcx.core",)),
    ("hetero", ("flagcx.hetero",)),
    ("adapters", ("flagcx.adapters", "flagcx.watchdog")),
    ("topology", ("flagcx.topology",)),
    ("bootstrap", ("flagcx.bootstrap",)),
    ("shared vocabulary", ("flagcx.errors", "flagcx.types", "flagcx.config", "flagcx.work", "flagcx.tensors", "flagcx.flight")),
]
"""The layers from the top down, each as the modules and packages it holds (the longest prefix decides)."""


def modules(package: str = "flagcx") -> dict[str, Path]:
    """Module name -> file, through the package's folders."""
    found: dict[str, Path] = {}
    base = ROOT / package
    files = [Path(d) / f for d, _, names in os.walk(base, followlinks=True) for f in names if f.endswith(".py")]
    for path in sorted(files):
        parts = list(path.relative_to(base).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join([package, *parts])] = path
    return found


_COMPILED = re.compile(r"^_[a-z0-9]+$")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The flagcx modules that module ``name`` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name in known:
                        found.add(alias.name)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                submodules = [f"{target}.{alias.name}" for alias in child.names if f"{target}.{alias.name}" in known]
                found.update(submodules)  # from package import module: the module, not the package's __init__
                # a private name that is no module is a compiled extension (``from .. import _shm``), not the package
                rest = [a.name for a in child.names if f"{target}.{a.name}" not in known and not _COMPILED.match(a.name)]
                if target in known and rest:
                    found.add(target)
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(name)
    return found


def cycles(package: str = "flagcx") -> list[list[str]]:
    """Every elementary cycle's members (strongly connected components of more than one module)."""
    mods = modules(package)
    graph = {m: imports_of(m, p, set(mods)) for m, p in mods.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in graph:
        if v not in index:
            strongconnect(v)
    return result


def layer_of(module: str) -> int:
    """Index in LAYERS of ``module`` (0 is the top); ValueError for a module no layer holds."""
    best = (-1, -1)
    for i, (_, members) in enumerate(LAYERS):
        for m in members:
            if (module == m or module.startswith(m + ".")) and len(m) > best[1]:
                best = (i, len(m))
    if best[0] < 0:
        raise ValueError(f"{module} is in no layer of tests/helpers/import_graph.py LAYERS: add it")
    return best[0]


def layer_violations(package: str = "flagcx") -> list[str]:
    """Every import of a higher layer, as "module (layer) imports module (layer)"."""
    mods = modules(package)
    found = []
    for name, path in sorted(mods.items()):
        mine = layer_of(name)
        for target in sorted(imports_of(name, path, set(mods))):
            theirs = layer_of(target)
            if theirs < mine:
                found.append(f"{name} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]})")
    return found


def main() -> None:
    found = cycles()
    for members in found:
        print("import circle: " + " <-> ".join(members))
    upward = layer_violations()
    for line in upward:
        print("against the layer order: " + line)
    if found or upward:
        sys.exit(1)
    print(f"no import circles among {len(modules())} flagcx modules; every import follows the layer order")


if __name__ == "__main__":
    main()
