"""The package's layers as ARCHITECTURE.md draws them: no import circles, no import back up a layer, every
module in a layer and every layer's module there (benchmarks/structure.py recomputes it from the tree)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

STRUCTURE = Path(__file__).resolve().parents[1] / "benchmarks" / "structure.py"


def _structure():
    spec = importlib.util.spec_from_file_location("structure", STRUCTURE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_layers_hold():
    assert _structure().layering() == {
        "import circles": [],
        "imports back up from a lower layer": [],
        "modules without a layer": [],
        "listed modules that do not exist": [],
    }


def test_a_listed_module_that_is_gone_breaks_the_check(monkeypatch):
    structure = _structure()
    monkeypatch.setitem(structure.LAYERS, "shard", 3)  # a module that no longer exists
    assert structure.layering()["listed modules that do not exist"] == ["shard"]
