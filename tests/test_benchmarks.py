"""The benchmark scripts are run by hand, at real size, rarely: these checks catch them rotting
against the library without running them (a 3B run costs an hour). Each name a script imports
from ``op_sensitivity``, at the top, inside a function or in a child process's code string, must
exist; the scripts' params must pass the library's validation."""

from __future__ import annotations

import ast
import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "benchmarks").glob("*.py"))


def _library_imports(tree: ast.AST, offset: int = 0) -> list[tuple[str, str, int]]:
    """(module, name, file line) of each ``from op_sensitivity... import name``, code strings included."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("op_sensitivity"):
            found += [(node.module, alias.name, offset + node.lineno) for alias in node.names]
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and "from op_sensitivity" in node.value
        ):
            found += _library_imports(ast.parse(node.value), offset + node.lineno - 1)
    return found


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ModuleNotFoundError:
        return False
    return True


def _missing_names(path: Path) -> list[str]:
    missing = []
    for module, name, line in _library_imports(ast.parse(path.read_text(), str(path))):
        if not (
            _importable(module)
            and (hasattr(importlib.import_module(module), name) or _importable(f"{module}.{name}"))
        ):
            missing.append(f"{path.name}:{line}: from {module} import {name}")
    return missing


def test_the_scan_sees_imports_in_functions_and_code_strings(tmp_path):
    script = tmp_path / "rotten.py"
    script.write_text(
        "from op_sensitivity.params import load_params\nfrom op_sensitivity.quantize import deploy\n"
        "def f():\n    from op_sensitivity.params import no_such_name\n"
        "CHILD = '''\nfrom op_sensitivity.no_such_module import x\n'''\n"
    )
    assert _missing_names(script) == [
        "rotten.py:4: from op_sensitivity.params import no_such_name",
        "rotten.py:6: from op_sensitivity.no_such_module import x",
    ]


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_each_name_a_benchmark_imports_from_the_library_exists(script):
    assert _missing_names(script) == []


def test_the_3b_estimate_benchmark_builds_valid_params(tmp_path, monkeypatch):
    """first_order_3b.py measures the exact pass with the 3B profile's other settings: its overrides
    must be a combination the params accept (an exact_budget left on with screening none was not)."""
    monkeypatch.setattr(sys, "path", [str(REPO / "benchmarks"), *sys.path])  # the script adds to it
    monkeypatch.delitem(sys.modules, "first_order_3b", raising=False)
    module = importlib.import_module("first_order_3b")
    params = module.profile_params(tmp_path, 8)
    assert params.model.source == "full_size_random"
    assert params.sensitivity.confidence_batches == 8
    assert params.sensitivity.native.screening == "none"
    assert params.sensitivity.native.exact_budget is None


def test_the_whole_dag_result_keeps_what_the_run_concluded(tmp_path, monkeypatch):
    """whole_dag.py's JSON is the raw source of the docs' whole-DAG figures: it must carry the run's
    metrics, screening block and stability verdict. The git-tracked outputs of the committed default
    run (a clean clone has no DVC-cached ones before `make repro`) and a screened pass's report."""
    monkeypatch.setattr(sys, "path", [str(REPO / "benchmarks"), *sys.path])
    monkeypatch.delitem(sys.modules, "whole_dag", raising=False)
    reports = tmp_path / "reports"
    for name in ("rank/stability.json", "validation/metrics.json", "sensitivity/agreement.json"):
        (reports / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / "reports" / name, reports / name)
    screening = {"audit": {"fallback": {"spearman": 0.5, "recall": 1.0}}, "escape": 0.02}
    (reports / "sensitivity/op_sensitivity.json").write_text(
        json.dumps({"metadata": {"screening": screening}})
    )
    doc = importlib.import_module("whole_dag").outcome(reports)
    stability = json.loads((REPO / "reports/rank/stability.json").read_text())
    assert doc["stability"]["verdict"] == stability["verdict"]
    assert "phases" not in doc["stability"]
    validation = json.loads((REPO / "reports/validation/metrics.json").read_text())
    assert doc["metrics"]["validation/metrics.json"]["kl_recovered"] == validation["kl_recovered"]
    assert sorted(doc["metrics"]) == ["sensitivity/agreement.json", "validation/metrics.json"]
    assert doc["screening"] == {"sensitivity/op_sensitivity.json": screening}
