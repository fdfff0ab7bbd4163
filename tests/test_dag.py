"""dvc.yaml against the code, so DVC can never serve a result computed by other code.

For each stage, the import closure of its script (read with ``ast``: every ``import`` anywhere in a
module, lazy ones included, plus the ``__init__.py`` of every package on the way and the package
data files) must be covered by the stage's deps; and the stage's library deps must be exactly the
directories (subpackages) and top-level modules that closure touches, so no stage reruns for code
it never runs. The library's layers import downward only.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import tomllib
import yaml

from tests.helpers import REPO

SRC = REPO / "src"
PACKAGE = "op_sensitivity"
PACKAGE_DIR = SRC / PACKAGE
# top-level modules first
LAYERS = (
    "data",
    "model",
    "schemes",
    "engines",
    "report",
    "validation",
    "fallback",
    "quantize",
    "preflight",
    "plan",
)
# What make repro runs before DVC (the params check and the plan), the profile it applies and the
# params schema writer: library users besides the stages, never a stage's dep.
TOOLS = (
    REPO / "scripts/check_params.py",
    REPO / "scripts/apply_profile.py",
    REPO / "scripts/params_schema.py",
    REPO / "scripts/check_reproduced.py",  # CI: the fresh clone's run against HEAD
    REPO / "scripts/serve_vllm.py",  # CI's last step: the default's checkpoint served by vLLM
)


def module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def imports_of(path: Path, module: str | None) -> set[str]:
    """Absolute names of the package's modules that ``path`` (module ``module``) imports."""
    package = None
    if module is not None:
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                assert package is not None, f"{path}: relative import outside the package"
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != PACKAGE:
                continue
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if module_file(f"{base}.{a.name}")}
    return found


def package_data() -> dict[str, list[str]]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return pyproject["tool"]["setuptools"].get("package-data", {})


def closure(script: Path) -> set[Path]:
    """Every project file running ``script`` can execute or read as package data."""
    todo, seen = imports_of(script, None), set()
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in seen:
                continue
            path = module_file(prefix)
            assert path is not None, f"{script}: imports {prefix}, which is no file of the package"
            seen.add(prefix)
            todo |= imports_of(path, prefix)
    files = {module_file(n) for n in seen}
    for pkg, globs in package_data().items():
        if pkg in seen:
            pkg_dir = SRC.joinpath(*pkg.split("."))
            files |= {f for g in globs for f in pkg_dir.glob(g)}
    return files


def _stages() -> dict[str, dict]:
    """Every stage's definition; a foreach (matrix) stage's is its ``do`` block."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: s.get("do", s) for name, s in stages.items()}


def _script(stage: dict) -> Path:
    m = re.search(r"python (stages/\S+\.py)", stage["cmd"])
    assert m, stage["cmd"]
    return REPO / m.group(1)


def _library_unit(path: Path) -> str:
    """What a stage should name for a library file: its subpackage directory, or the top-level file."""
    rel = path.relative_to(PACKAGE_DIR)
    return str(Path("src", PACKAGE, rel.parts[0] if len(rel.parts) > 1 else rel.name))


@pytest.mark.parametrize("name", list(_stages()))
def test_stage_deps_are_the_import_closure_of_its_script(name):
    stage = _stages()[name]
    deps = [d for d in stage["deps"] if "${" not in d]
    script = _script(stage)
    assert str(script.relative_to(REPO)) in deps
    files = closure(script)
    assert files, f"{script} imports nothing from the library"
    uncovered = [
        str(f.relative_to(REPO))
        for f in files
        if not any(f == REPO / d or (REPO / d) in f.parents for d in deps)
    ]
    assert not uncovered, f"stage {name}: imported but not a dep: {uncovered}"
    library_deps = {d for d in deps if d.startswith(f"src/{PACKAGE}")}
    extra = sorted(library_deps - {_library_unit(f) for f in files})
    assert not extra, f"stage {name}: deps on library code it never runs: {extra}"


def test_closure_follows_lazy_relative_and_package_imports():
    files = {str(f.relative_to(PACKAGE_DIR)) for f in closure(REPO / "stages/load_model.py")}
    assert {"__init__.py", "model/__init__.py", "model/source.py", "model/full_size.py"} <= files
    assert "model/configs/qwen2_5_vl_3b_instruct.json" in files  # read with importlib.resources
    assert "data/calibration.py" in files and "engines/runner.py" not in files
    sens = {str(f.relative_to(PACKAGE_DIR)) for f in closure(REPO / "stages/sensitivity.py")}
    assert {"engines/inc_loop.py", "engines/native.py"} <= sens  # imported inside runner.engine() only


SHARED_PACKAGES = ("params",)  # the shared vocabulary, split into modules: below every layer


def _rank(module: str) -> int:
    parts = module.split(".")
    if parts[1] in SHARED_PACKAGES:
        return 0
    return 1 + LAYERS.index(parts[1]) if len(parts) > 2 or parts[1] in LAYERS else 0


def test_layers_import_downward_only():
    """shared vocabulary <- data <- model <- schemes <- engines <- report <- validation <- fallback
    <- preflight <- plan; no stage imports."""
    violations = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        text = path.read_text()
        assert not re.search(r"^\s*(from|import) stages", text, re.M), f"{path} imports a stage"
        for imported in imports_of(path, module):
            if imported != PACKAGE and _rank(imported) > _rank(module):
                violations.append(f"{module} -> {imported}")
    assert not violations, violations


def test_no_stage_depends_on_the_plan():
    """The plan reads DVC's state and this machine: no artifact may be a function of it."""
    for name, stage in _stages().items():
        assert not any("/plan" in str(f) for f in closure(_script(stage))), name


def test_every_library_module_is_used_by_some_stage():
    used = set().union(*(closure(_script(s)) for s in _stages().values()), *(closure(t) for t in TOOLS))
    unused = [str(p.relative_to(REPO)) for p in PACKAGE_DIR.rglob("*.py") if p not in used]
    assert not unused, f"library modules no stage runs (dead code, or a stage lacks its dep): {unused}"


def test_data_deps_are_what_each_stage_reads():
    """The model stage reads one path, which its source decides; the ONNX graph is always a dep."""
    stages = _stages()
    load_data = [d for d in stages["load_model"]["deps"] if not d.startswith(("src/", "stages/"))]
    assert load_data == ["${model.input}/", "reports/params_check.json"]
    assert "${fallback.onnx_model}" in stages["fallback_list"]["deps"]
    assert "--calibration" not in stages["load_model"]["cmd"]
