"""The package's layers point one way: a module imports (at module level or inside a
function) only from its own layer or below. Read from the source, so an import hidden in a
function counts too.

    0  paths, runtime, model_names, indexed_files, startup_signals, cpu_compat, task_names
    1  config
    2  data, model
    3  training
    4  conversion, inference
    5  prepare, evaluation, launch
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

LAYERS = {
    "paths": 0, "runtime": 0, "model_names": 0, "indexed_files": 0, "startup_signals": 0,
    "cpu_compat": 0, "task_names": 0, "__init__": 0,
    "config": 1, "data": 2, "model": 2, "training": 3, "conversion": 4, "inference": 4,
    "prepare": 5, "evaluation": 5, "launch": 5,
}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno


def test_no_import_runs_up_a_layer():
    package = ROOT / "danube"
    upward = []
    for path in sorted(package.rglob("*.py")):
        part = path.relative_to(package).parts[0].removesuffix(".py")
        assert part in LAYERS, f"{part}: give it a layer in tests/test_layers.py"
        for module, line in _imports(path):
            names = module.split(".")
            if names[0] != "danube" or len(names) < 2:
                continue
            target = names[1]
            assert target in LAYERS, f"{module}: give it a layer"
            if LAYERS[target] > LAYERS[part]:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert upward == [], "\n".join(upward)
