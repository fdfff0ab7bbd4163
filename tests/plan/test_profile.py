"""The real-size profiles: each applies to params.yaml, validates, and plans within its machine."""

from __future__ import annotations

import shutil

import pytest
import yaml

from op_sensitivity.errors import InputError
from op_sensitivity.params import load_params
from op_sensitivity.plan.model import describe
from op_sensitivity.plan.pending import all_stages
from op_sensitivity.plan.profile import apply, parse_overrides, read_profile
from op_sensitivity.plan.stages import Machine, build_plan
from tests.helpers import REPO, run_script

PROFILES = REPO / "profiles"
CPU_24GB = Machine("test CPU", 2, 23.5, None, None)
H100 = Machine("test CPU", 16, 128.0, "NVIDIA H100 80GB HBM3", 79.1)
GPU_24GB = Machine("test CPU", 16, 128.0, "NVIDIA RTX 4090", 23.6)
# the architectures with random weights stand in for the snapshots (same config, no download)
RANDOM = {"model.source": "full_size_random", "model.input": "data/calibration"}


def _stages(p) -> list[str]:
    return all_stages(p.schemes.run, REPO / "dvc.yaml", p.quantize.targets)


def _applied(tmp_path, name: str, **extra):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    apply(params, {**read_profile(PROFILES / f"{name}.yaml"), **RANDOM, **extra})
    return load_params(params), params


def _plan(p, machine):
    return build_plan(
        p,
        describe(p.model),
        _stages(p),
        machine,
        probe_forward=False,
    )


@pytest.mark.parametrize(
    ("name", "machine", "ops", "size", "batches"),
    [
        ("3b-cpu", CPU_24GB, 417, "3b", 8),
        ("3b-gpu", H100, 417, "3b", 8),
        ("7b-cpu", CPU_24GB, 163, "7b", 8),
        ("7b-gpu", H100, 361, "7b", 8),
    ],
)
def test_each_profile_applies_and_fits_its_machine(tmp_path, name, machine, ops, size, batches):
    p, path = _applied(tmp_path, name)
    assert p.model.full_size == size and p.sensitivity.engine == "native"
    assert p.crosscheck.carves(describe(p.model).params)  # INC checked on a carved copy
    plan = _plan(p, machine)
    assert plan.stops == [], plan.stops
    sens = next(s for s in plan.stages if s.stage == "sensitivity")
    assert sens.work.startswith(f"native (inc_cpu): {ops} ops x 2 phases x {batches} batches")
    # every real-size profile estimates every op from gradients: 8 batches are affordable
    sweeps = p.sensitivity.native.first_order_points
    estimated = f"estimated ({sweeps} forward+backward sweeps a batch), exact where it decides"
    assert (estimated in sens.work) == (batches >= 8) == (p.sensitivity.native.screening == "first_order")
    assert sens.device == ("cuda" if machine.gpu else "cpu")
    text = path.read_text()  # comments kept: what the file says of each field survives
    assert "# One block per stage" in text and "# stage curve: each ranking's top-n keep-lists" in text


def test_gpu_profiles_stop_where_the_gpu_is_absent_or_too_small(tmp_path):
    p3, _ = _applied(tmp_path, "3b-gpu")
    with pytest.raises(InputError, match="sensitivity.native.device: cuda, but this machine has no CUDA"):
        _plan(p3, CPU_24GB)
    assert _plan(p3, GPU_24GB).stops == []  # the 3B fits a 24 GB GPU
    p7, _ = _applied(tmp_path, "7b-gpu")
    assert "needs ~38 GiB, this machine has 24 GiB" in _plan(p7, GPU_24GB).stops[0]


def test_the_7b_cpu_profile_scores_the_vision_tower_only(tmp_path):
    p, _ = _applied(tmp_path, "7b-cpu")
    facts = describe(p.model)
    sens = next(s for s in _plan(p, CPU_24GB).stages if s.stage == "sensitivity")
    vision = sum(op.tower == "vision" for op in facts.ops)
    assert vision == 163 and sens.work.startswith("native (inc_cpu): 163 ops")
    assert sens.memory_gib < 23.5  # every op scored would need ~38 GiB (test_gpu_profiles_stop...)


def test_a_bad_value_or_key_leaves_params_yaml_unchanged(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    before = params.read_text()
    with pytest.raises(InputError, match=r"params.yaml \(profile and -S applied\): sensitivity.max_ops"):
        apply(params, {"sensitivity.max_ops": -1})
    with pytest.raises(InputError, match="'sensitivty' is not a block"):
        apply(params, {"sensitivty.max_ops": 5})
    assert params.read_text() == before
    with pytest.raises(InputError, match="expected key.path=value"):
        parse_overrides(["sensitivity.max_ops"])
    assert parse_overrides(["a.b=500", "c=[x, y]", "d=null"]) == {"a.b": 500, "c": ["x", "y"], "d": None}


def test_the_script_applies_a_profile_and_says_what_changed(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    args = [str(PROFILES / "3b-cpu.yaml"), "-S", "model.source=full_size_random", "-S", "model.input=x"]
    code, err = run_script(REPO / "scripts/apply_profile.py", args, tmp_path)
    assert code == 0, err
    data = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert data["sensitivity"]["native"]["device"] == "cpu" and data["model"]["input"] == "x"
    assert data["captions"]["count"] == 8 and data["curve"]["random_lists"] == 1
    assert data["schemes"]["arithmetic"] == "kernels" and data["curve"]["crossings"] == [0.5]
    assert data["sensitivity"]["confidence_batches"] == 8
    code, err = run_script(REPO / "scripts/apply_profile.py", [str(PROFILES / "nope.yaml")], tmp_path)
    assert code == 2 and "profiles/nope.yaml: profile not found" in err
