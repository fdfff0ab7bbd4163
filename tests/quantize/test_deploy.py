"""The quantize stage's library: what the artifact keeps, refused lists, the report section."""

import pytest

from op_sensitivity.errors import InputError
from op_sensitivity.inventory import read_inventory
from op_sensitivity.quantize.deploy import agreement, metrics, runtime_differs, to_quantize
from op_sensitivity.report.deployment import section

REPORT = {"metadata": {"excluded_ops": [{"op_name": "lm_head", "op_type": "Linear", "reason": "skip"}]}}


def _report(inventory):
    ops = [
        {"op_name": op.name, "module": op.name, "position": i}
        for i, op in enumerate(inventory)
        if op.name != "lm_head"
    ]
    return {**REPORT, "phases": {"fallback": {"ops": ops}, "requant": {"ops": ops}}}


def test_the_artifact_quantizes_the_scored_ops_the_list_and_the_pass_do_not_keep(small_model_dir):
    inventory = read_inventory(small_model_dir.parent / "op_inventory.json")
    group = next(op.fused_group for op in inventory if op.fused_group)
    members = [op.name for op in inventory if op.fused_group == group]
    keep_list = {"ops": [{"module": m} for m in members] + [{"module": "model.language_model.embed_tokens"}]}
    quantize = to_quantize(keep_list, _report(inventory), inventory, fused=True)
    expected = [
        op.name for op in inventory if op.name not in {*members, "lm_head", keep_list["ops"][-1]["module"]}
    ]
    assert quantize == expected  # model order; lm_head is the pass's own exclusion


def test_a_kept_op_of_the_pass_brings_its_fused_group_only_where_the_runtime_fuses(small_model_dir):
    inventory = read_inventory(small_model_dir.parent / "op_inventory.json")
    group = next(op.fused_group for op in inventory if op.fused_group)
    members = [op.name for op in inventory if op.fused_group == group]
    report = _report(inventory)
    report["metadata"]["excluded_ops"].append({"op_name": members[0], "op_type": "Linear", "reason": "p"})
    report["phases"]["fallback"]["ops"] = [
        o for o in report["phases"]["fallback"]["ops"] if o["module"] != members[0]
    ]
    fused = to_quantize({"ops": []}, report, inventory, fused=True)
    unfused = to_quantize({"ops": []}, report, inventory, fused=False)
    assert not set(members) & set(fused)
    assert set(members[1:]) <= set(unfused) and members[0] not in unfused


def test_a_list_that_splits_a_fused_group_is_refused_before_anything_is_written(small_model_dir):
    inventory = read_inventory(small_model_dir.parent / "op_inventory.json")
    group = next(op.fused_group for op in inventory if op.fused_group)
    members = sorted(op.name for op in inventory if op.fused_group == group)
    with pytest.raises(InputError, match=f"keep-list splits fused group {group}: keeps"):
        to_quantize({"ops": [{"module": members[0]}]}, _report(inventory), inventory, fused=True)
    unfused = to_quantize({"ops": [{"module": members[0]}]}, _report(inventory), inventory, fused=False)
    assert members[0] not in unfused and set(members[1:]) <= set(unfused)  # ORT, INC: a split is theirs


def _doc(**fields) -> dict:
    """A quantize document with the fields the section reads (``fields`` replace them)."""
    return {
        "target": "compressed_tensors",
        "format": "int-quantized",
        "artifact": {"bytes": 2_500_000},
        "quantized": 25,
        "kept": ["lm_head"],
        "runtime": {"loader": "L", "weights": "w", "inputs": "i", "matmul": "m", "notes": ["n"]},
        "served": True,
        "round_trip": None,
        "runtime_differs": runtime_differs({"a", "c"}, ["a", "b"]),
        "all_int8": {"kl": 4.0},
        "agreement": {**agreement("kl", {"kl": 3.0}, {"kl": 2.0}), "bar": 0.1, "gap": "g"},
        **fields,
    }


def test_metrics_and_section_read_the_document():
    doc = _doc()
    assert metrics(doc) == {"kl_int8": 4.0, "kl_kept": 3.0, "kl_native": 2.0, "size_mb": 2.5}
    text = section([doc])
    assert (
        "| compressed_tensors | int-quantized | its runtime | 2.50 | 25 | 1 | kl | 3 | 2 | 1.5 | "
        "**outside** 0.1 | 4 |" in text
    )
    assert "**not served here**" not in text
    assert "measured vs predicted **outside** its bar (0.1 relative); the gap: g" in text
    assert "- compressed_tensors (L): weights w; inputs i; matmul m; n" in text
    assert (
        "**the runtime runs 1 listed op(s) in high precision anyway (b); the runtime quantizes 1 op(s) "
        "the list keeps (c)**" in text
    )
    close = {**agreement("kl", {"kl": 2.1}, {"kl": 2.0}), "bar": 0.1, "gap": "g"}
    same = section([{**doc, "runtime_differs": runtime_differs({"a", "b"}, ["a", "b"]), "agreement": close}])
    assert "the loaded runtime quantizes exactly the 25 listed ops" in same
    assert "| 2.1 | 2 | 1.05 | within 0.1 |" in same
    # a figure read back in a round trip of the export is said to be one, with why
    trip = section([{**doc, "target": "modelopt_int8", "served": False, "round_trip": "why"}])
    assert "| modelopt_int8 | int-quantized | round trip, **not served here** |" in trip
    assert "  - **not served here**: why" in trip
    assert "cause measured alone" not in text  # no cause: no line


def test_the_section_states_the_causes_and_the_bar_they_give():
    """The 3B ModelOpt INT8 figures of 2026-12-04 (bf16 as stored): the bar derived from the stored
    dtype's cause holds a measured figure the fixed floor called outside."""
    from op_sensitivity.quantize.causes import Cause, derived_bar

    cause = Cause("stored dtype bfloat16", 6.668e-4, "the float model as stored")
    a = {**agreement("kl", {"kl": 6.939e-3}, {"kl": 6.255e-3}), **derived_bar("kl", 1e-3, 6.255e-3, [cause])}
    doc = _doc(target="modelopt_int8", all_int8={"kl": 0.025}, agreement={**a, "gap": "g"})
    text = section([doc])
    assert "| 0.006939 | 0.006255 | 1.11 | within 0.761 | 0.025 |" in text
    assert (
        "    - cause measured alone: stored dtype bfloat16, kl 0.0006668 (the float model as stored)" in text
    )
    assert "    - bar 0.001 (floor) + 0.004751 / 0.006255 (their bound: floor + (K + 2 sqrt" in text
    assert "predicted + the causes = 0.006922, measured / that = 1.002" in text


def test_modelopt_figures_are_a_round_trip_and_the_served_targets_are_not():
    from op_sensitivity.quantize.targets import TARGETS

    trips = {name for name, target in TARGETS.items() if target.round_trip is not None}
    assert trips == {"modelopt_int8", "modelopt_fp8"}


def test_an_artifact_that_quantizes_other_ops_than_the_list_is_removed_and_refused(small_model_dir, tmp_path):
    """Read back from a real checkpoint: a list it does not match (here, one op more than written)."""
    pytest.importorskip("compressed_tensors")
    from op_sensitivity.quantize.base import Inputs
    from op_sensitivity.quantize.compressed_tensors import CompressedTensors
    from op_sensitivity.quantize.deploy import _check_artifact
    from op_sensitivity.quantize.hf_checkpoint import linear_modules

    target, out = CompressedTensors(), tmp_path / "ct"
    written = [n for n in linear_modules(small_model_dir) if n != "lm_head"]
    target.write(Inputs(small_model_dir, written, [], tmp_path, 10**9), out)
    _check_artifact(target, out, written)  # as written: kept
    assert out.is_dir()
    with pytest.raises(InputError, match=r"quantizes \[\] that the keep-list keeps and keeps \['lm_head'\]"):
        _check_artifact(target, out, [*written, "lm_head"])
    assert not out.exists()


def test_every_target_of_the_params_keeps_the_contract(tmp_path):
    """Behaviour, not attributes: for each target the params can name, the factory gives its
    backend, under the name and scheme the params pair it with (a scheme the native engine can
    describe: its prediction); ``require`` passes where the tool is installed, else names the extra
    to install; and ``quantized_in``, what the stage reads back after writing, refuses a directory
    that is no artifact of the target with one line naming it (an empty one here), never a
    traceback or an empty set (which ``_check_artifact`` would compare as "quantizes nothing")."""
    import re

    from op_sensitivity.params import TARGET_SCHEMES
    from op_sensitivity.quantize.targets import TARGETS, target
    from op_sensitivity.schemes import describe

    assert list(TARGETS) == list(TARGET_SCHEMES)
    for name in TARGETS:
        t = target(name)
        assert (t.name, t.scheme) == (name, TARGET_SCHEMES[name]) and 0 < t.bar <= 0.1
        assert describe(t.scheme).name == t.scheme
        try:
            t.require()
        except InputError as e:
            assert str(e) == f"quantize target {name}: {t.requires[0]} is not installed ({t.extra})"
            continue
        empty = tmp_path / name
        empty.mkdir()
        with pytest.raises(InputError, match=re.escape(str(empty))):
            t.quantized_in(empty)


def test_the_stage_refuses_a_split_list_before_anything_is_written(small_model_dir, tmp_path):
    from op_sensitivity.params import load_params
    from op_sensitivity.quantize.deploy import quantize_target
    from tests.helpers import REPO

    inventory = read_inventory(small_model_dir.parent / "op_inventory.json")
    group = next(op.fused_group for op in inventory if op.fused_group)
    first = next(op.name for op in inventory if op.fused_group == group)
    dirs = dict.fromkeys(("model", "calibration", "test", "keep_list", "spectrum"), tmp_path / "none")
    dirs["model"] = small_model_dir
    out = tmp_path / "out"
    with pytest.raises(InputError, match=f"keep-list splits fused group {group}"):
        quantize_target(
            "compressed_tensors",
            load_params(REPO / "params.yaml"),
            dirs,
            {"ops": [{"module": first}]},
            _report(inventory),
            inventory,
            out,
        )
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_target_whose_tool_is_missing_names_the_extra_to_install():
    from op_sensitivity.quantize.compressed_tensors import CompressedTensors

    class Uninstalled(CompressedTensors):  # the same target, its tool under a name no one installed
        requires = ("no_such_quantization_tool",)

    with pytest.raises(
        InputError, match=r"compressed_tensors: no_such_quantization_tool is not installed \(pip"
    ):
        Uninstalled().require()
