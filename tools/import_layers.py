"""Count memopt's import back-edges: a module importing a module of a later layer.

The layers, earliest first (docs/architecture.md): a module may import its own layer and earlier
ones. Imports inside functions count too (a deferred import is still a dependency); imports under
``if TYPE_CHECKING:`` do not (they are for annotations only).

    python tools/import_layers.py          # prints every back-edge, exits 1 if there is one
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LAYERS: list[tuple[str, ...]] = [
    ("memopt.errors", "memopt.config", "memopt.device", "memopt._version"),
    ("memopt.memory", "memopt.kernels"),
    ("memopt.ir",),
    ("memopt.passes",),
    ("memopt.optim",),
    ("memopt.plan",),
    ("memopt.planner",),
    ("memopt.runtime", "memopt.checkpoint"),
    ("memopt.pipeline", "memopt.api", "memopt.integrations"),
    ("memopt.cli", "memopt"),
]


# Pairs that are not back-edges but still must not exist: the runtime carries out a Plan
# (memopt.plan) and never reaches into the planner that made it.
FORBIDDEN = [("memopt.runtime", "memopt.planner")]


def layer_of(module: str) -> int | None:
    best, rank = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > rank:
                best, rank = i, len(name)
    return best


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    type_checking: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_checking.update(id(n) for child in node.body for n in ast.walk(child))
    out = []
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            out += [(target if layer_of(n) is None else n, node.lineno) for n in names]
    return [(name, line) for name, line in out if name == "memopt" or name.startswith("memopt.")]


def back_edges(root: Path) -> list[str]:
    edges = []
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        mine = layer_of(module)
        tree = ast.parse(path.read_text())
        for target, line in _imports(tree, module, path.name == "__init__.py"):
            theirs = layer_of(target)
            where = f"{path.relative_to(root.parent)}:{line}: {module}"
            if mine is not None and theirs is not None and theirs > mine:
                edges.append(f"{where} (layer {mine}) imports {target} (layer {theirs})")
            elif any(_under(module, a) and _under(target, b) for a, b in FORBIDDEN):
                edges.append(f"{where} imports {target}, which it must not")
    return edges


def main() -> int:
    root = Path(__file__).resolve().parents[1] / "memopt"
    edges = back_edges(root)
    for edge in edges:
        print(edge)
    print(f"{len(edges)} back-edge(s)")
    return 1 if edges else 0


if __name__ == "__main__":
    sys.exit(main())
