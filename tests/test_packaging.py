import configparser
import re

import tomllib

from tests.helpers import REPO


def _name(req: str) -> str:
    return re.split(r"[<>=!~ \[]", req, maxsplit=1)[0].lower()


def test_pixi_lists_the_same_pinned_dependencies_as_pyproject():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pixi = tomllib.loads((REPO / "pixi.toml").read_text())
    deps = {_name(r): r[len(_name(r)) :].strip() for r in pyproject["project"]["dependencies"]}
    pixi_deps = {k.lower(): v for k, v in pixi["pypi-dependencies"].items() if k != "op-sensitivity"}
    assert pixi_deps == deps
    assert deps["neural-compressor"] == "==3.7.1" and deps["torch"] == "==2.13.0"
    dev = {_name(r): r[len(_name(r)) :] for r in pyproject["project"]["optional-dependencies"]["dev"]}
    assert pixi["feature"]["dev"]["pypi-dependencies"] == dev
    assert pixi["dependencies"]["python"] == pyproject["project"]["requires-python"]


def test_the_tool_extras_match_in_both_manifests_and_make_test_installs_them():
    """The quantizers whose loading of our exports the tests check: optional, but installed by `make`."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pixi = tomllib.loads((REPO / "pixi.toml").read_text())
    extras = {k: v for k, v in pyproject["project"]["optional-dependencies"].items() if k != "dev"}
    assert extras["modelopt"] == ["nvidia-modelopt>=0.47,<0.48"] and set(extras) == {"modelopt", "ort", "ct"}
    for name, reqs in extras.items():
        assert pixi["feature"][name]["pypi-dependencies"] == {_name(r): r[len(_name(r)) :] for r in reqs}
    assert pixi["environments"]["dev"] == ["dev", *extras]  # like `make test`'s install
    assert f"pip install -q -e '.[dev,{','.join(extras)}]'" in (REPO / "Makefile").read_text()


def test_dvc_config_is_offline_with_a_local_default_remote():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / ".dvc/config")
    assert cfg["core"]["analytics"] == "false" and cfg["core"]["check_update"] == "false"
    remote = cfg["core"]["remote"]
    assert "://" not in cfg[f"'remote \"{remote}\"'"]["url"]  # a plain local path


def test_readme_opens_with_the_two_commands_and_ci_calls_the_test_one():
    head = (REPO / "README.md").read_text()[:1500]
    assert "make repro" in head and "make test" in head
    assert "make test" in (REPO / ".ci/run").read_text()
