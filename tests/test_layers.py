"""The layers stay as docs/architecture.md draws them: a module imports only layers below its own. Read from
the source (every import statement, at any depth, except those only type checkers run), so a new upward
import fails here before it couples two layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hsft"
# Layers below the stages, and what none of them may import.
LOWER = ("engine", "eval", "model", "data", "ops")
UPPER = ("hsft.config", "hsft.stages", "hsft.pipeline", "hsft.experiments", "hsft.recipes")


def _runtime_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only: set[int] = set()
    for node in ast.walk(tree):
        # `if TYPE_CHECKING:` blocks are read by type checkers only.
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            type_only |= {id(child) for stmt in node.body for child in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def _violations(layer: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for line, name in _runtime_imports(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    return sorted(set(bad))


@pytest.mark.parametrize("layer", LOWER)
def test_no_layer_below_the_stages_imports_the_run_config_or_the_stages(layer):
    assert _violations(layer, UPPER) == []


def test_the_model_does_not_import_the_evaluation():
    assert _violations("model", ("hsft.eval",)) == []


def test_the_check_sees_an_upward_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from hsft.config import RunConfig\n"
                      "def f():\n    from hsft.eval.cli import load_checkpoint\n")
    assert _runtime_imports(module) == [(1, "typing"), (1, "typing.TYPE_CHECKING"), (5, "hsft.eval.cli"),
                                        (5, "hsft.eval.cli.load_checkpoint")]
