"""The import layering of docs/architecture.md holds: no module imports a later layer, and the runtime
never imports the planner (``tools/import_layers.py`` counts the edges)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("import_layers", _ROOT / "tools" / "import_layers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_module_imports_a_later_layer_and_the_runtime_never_imports_the_planner():
    assert _tool().back_edges(_ROOT / "memopt") == []


def test_every_package_module_has_a_layer():
    tool = _tool()
    modules = [tool._module_name(p, _ROOT / "memopt") for p in (_ROOT / "memopt").rglob("*.py")]
    assert [m for m in modules if tool.layer_of(m) is None] == []


def test_the_counter_sees_a_back_edge(tmp_path):
    package = tmp_path / "memopt"
    (package / "runtime").mkdir(parents=True)
    (package / "config.py").write_text("from memopt.api import optimize\n")
    (package / "runtime" / "step.py").write_text("def f():\n    from memopt.planner.solve import plan\n")
    edges = _tool().back_edges(package)
    assert len(edges) == 2 and "memopt.config (layer 0) imports memopt.api" in edges[0] and "must not" in edges[1]
