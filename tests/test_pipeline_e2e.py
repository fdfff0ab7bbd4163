"""The real DAG with real DVC in a throwaway copy of the repo: repro, no-op rerun, partial rerun,
a fresh clone's repro giving the same bytes and lock, push / clone / pull round trip, and a
bad-input stage failure."""

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from op_sensitivity.fallback.exports import inc_pattern
from tests.helpers import REPO, SMALL_TINY, copy_repo, run

STAGES = (
    "check_params",
    "prepare_captions",
    "load_model",
    "sensitivity",
    "crosscheck",
    "curve",
    "fallback_list",
    "validate",
    "rank_report",
    # one stage per scheme of the repo's params.yaml schemes.run, one per quantize target (foreach)
    *(
        f"scheme_sensitivity@{s}"
        for s in yaml.safe_load((REPO / "params.yaml").read_text())["schemes"]["run"]
    ),
    *(f"quantize@{t}" for t in yaml.safe_load((REPO / "params.yaml").read_text())["quantize"]["targets"]),
)
OUTPUTS = (
    "data/calibration/manifest.jsonl",
    "data/selection/manifest.jsonl",
    "data/test/manifest.jsonl",
    "models/qwen2_5_vl/model.safetensors",
    "reports/model/op_inventory.json",
    "reports/sensitivity/op_sensitivity.json",
    "reports/op_sensitivity.md",
    "reports/plots/spectrum.png",
    "reports/fallback/fallback_ops.json",
    "reports/fallback/inc_op_name_dict.json",
)


def _ran(stdout: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", stdout))


def _digest(root, rel):
    return hashlib.sha256((root / rel).read_bytes()).hexdigest()


def _set_params(repo, **blocks):
    path = repo / "params.yaml"
    data = yaml.safe_load(path.read_text())
    for block, values in blocks.items():
        for key, value in values.items():
            data[block][key] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("e2e") / "repo")
    (repo / "dvc.lock").unlink(missing_ok=True)
    data = yaml.safe_load((repo / "params.yaml").read_text())
    data["captions"]["count"] = 4
    data["model"]["tiny"].update(SMALL_TINY)
    data["sensitivity"]["confidence_batches"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    run(["git", "commit", "-qam", "small params"], repo)
    assert _planned(repo) == set(STAGES)  # a fresh clone: every stage, as DVC runs them next
    first = run(["dvc", "repro"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "first run"], repo)
    return repo, first.stdout


def _planned(root, probe: bool = True) -> set[str]:
    """The stages `make repro`'s plan lists (scripts/check_params.py reads DVC's status)."""
    out = run([sys.executable, "scripts/check_params.py", *([] if probe else ["--no-probe"])], root).stdout
    names = {line.split()[0] for line in out.splitlines() if line.split()}
    if "nothing to run: every stage is up to date" in out:
        return set()
    return names & set(STAGES)


def test_repro_runs_all_stages_and_writes_both_phases(repo):
    root, stdout = repo
    assert _ran(stdout) == set(STAGES)
    report = json.loads((root / "reports/sensitivity/op_sensitivity.json").read_text())
    inventory = json.loads((root / "reports/model/op_inventory.json").read_text())
    n_ops = len(inventory["ops"])
    assert n_ops == 17  # 1 Conv3d + 5 + 2 merger (vision), Embedding + 7 (text), lm_head
    for phase in ("fallback", "requant"):
        ops = report["phases"][phase]["ops"]
        assert len(ops) == n_ops  # every op scored, Conv3d included
        assert all(isinstance(o["mse"], float) and o["mse"] >= 0 for o in ops)
    assert report["metadata"]["measured_at"] == "lm_head.module"
    assert report["metadata"]["calibration"]["samples_used"] == 1
    assert report["metadata"]["model"]["random_weights"] is True
    check = json.loads((root / "reports/sensitivity/crosscheck.json").read_text())
    assert check["passes_bar"] and check["candidate"]["engine"] == "native"  # int8 kernels: INC to the bit
    assert check["phases"]["fallback"]["spearman"] == 1.0
    assert "## Engine crosscheck" in (root / "reports/op_sensitivity.md").read_text()
    metrics = json.loads((root / "reports/sensitivity/metrics.json").read_text())
    last = max(report["phases"]["requant"]["ops"], key=lambda o: o["position"])  # INC: the curve's end
    assert metrics == {"ops": n_ops, "int8_mse": last["mse"]}
    agreement = json.loads((root / "reports/sensitivity/agreement.json").read_text())
    assert agreement == {"engine_rho": 1.0}
    assert check["phases"]["fallback"]["max_rel_diff"] == 0.0  # INC to the bit
    splits = {
        split: [json.loads(line) for line in (root / f"data/{split}/manifest.jsonl").read_text().splitlines()]
        for split in ("calibration", "selection", "test")
    }
    assert [len(r) for r in splits.values()] == [4, 6, 6]
    images = [{r["image_id"] for r in records} for records in splits.values()]
    assert sum(len(i) for i in images) == len(set().union(*images))  # disjoint by image
    headline = json.loads((root / "reports/validation/metrics.json").read_text())
    assert set(headline) == {"kl_int8", "kl_kept", "kl_recovered", "kl_random"}
    assert 0 < headline["kl_kept"] < headline["kl_int8"] and 0 < headline["kl_recovered"] <= 1
    validation = json.loads((root / "reports/validation/validation.json").read_text())
    assert (
        validation["reference"]["fp32"]["kl"] == 0.0 and validation["inc_ptq"]["rel_diff"]["logit_se"] < 1e-4
    )
    assert validation["test"]["samples"] == 6  # the test split, not the selection split the curve used
    curve_doc = json.loads((root / "reports/validation/curve.json").read_text())
    assert curve_doc["selection"]["samples"] == 6
    assert validation["reference"]["all_int8"] != curve_doc["reference"]["all_int8"]
    for name in ("fallback", "requant", "measured", "random"):
        row = json.loads((root / f"reports/rankings/{name}.json").read_text())
        shares = validation["rankings"][name]
        assert row == {"n50": shares["0.5"], "n90": shares["0.9"], "n99": shares["0.99"]}
        assert all(n is None or 0 <= n <= n_ops for n in row.values())
    curve = (root / "reports/validation/curve.csv").read_text().splitlines()
    assert curve[0].startswith("n,fallback_kl_recovered") and len(curve) == 2 + n_ops  # n = 0..N
    text = (root / "reports/op_sensitivity.md").read_text()
    assert "## Validation on held-out captions" in text
    assert "on the test split, images neither the calibration nor the choice used" in text
    assert "| INC fallback |" in text and "| random |" in text
    keep = json.loads((root / "reports/fallback/fallback_ops.json").read_text())
    kept = {o["module"] for o in keep["ops"]}
    for op in inventory["ops"]:  # no fused group split: kept whole or quantized whole
        if op["fused_group"]:
            members = {o["name"] for o in inventory["ops"] if o["fused_group"] == op["fused_group"]}
            assert members <= kept or not members & kept
    runtime = json.loads((root / "reports/runtime/sensitivity.json").read_text())["passes"][0]
    assert runtime["engine"] == "inc" and runtime["seconds"]["fallback"] > 0
    crosscheck_runtime = json.loads((root / "reports/runtime/crosscheck.json").read_text())
    assert crosscheck_runtime["passes"][0]["engine"] == "native"


HEADLINE = {
    *("ops", "int8_mse", "engine_rho", "kept", "bits", "seconds", "peak_gib", "top_same"),
}


def test_dvc_metrics_are_the_headline_numbers_and_fit_210_columns(repo):
    """Per-op names, configuration and strings stay in the artifacts (docs/artifacts.md)."""
    root, _ = repo
    table = run(["dvc", "metrics", "show"], root).stdout
    assert max(len(line) for line in table.splitlines()) <= 210, table
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], root).stdout)
    files = next(iter(shown.values()))["data"]
    keys = {k for f in files.values() for k, v in f["data"].items() if not isinstance(v, list)}
    # DVC leaves out a null: top_same is null when the list takes no op from the ranking
    stability = json.loads((root / "reports/rank/stability_metrics.json").read_text())
    assert list(stability) == ["top_same"]
    shown_keys = keys | ({"top_same"} if stability["top_same"] is None else set())
    validation = {"kl_int8", "kl_kept", "kl_recovered", "kl_random", "n50", "n90", "n99"}
    assert shown_keys == HEADLINE | validation | {"kl_native", "size_mb"}  # + the deploy rows
    assert all(
        isinstance(v, (int, float))
        for f in files.values()
        for v in f["data"].values()
        if v is not None and not isinstance(v, list)
    )


def _artifacts(root):
    """Every file the DAG writes except the runtime metrics (seconds and host facts)."""
    tops = ("data/calibration", "data/selection", "data/test", "models", "reports")
    return {
        str(p.relative_to(root)): _digest(root, p.relative_to(root))
        for top in tops
        for p in sorted((root / top).rglob("*"))
        if p.is_file() and "runtime" not in p.parts and p.name != ".gitignore"
    }


def test_fresh_clone_repro_gives_the_same_bytes_and_lock(repo, tmp_path):
    """Same params, inputs and machine kind: byte-identical artifacts and an unchanged dvc.lock."""
    root, _ = repo
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path)
    # No cache: every stage with a cached output recomputes it. crosscheck's and check_params'
    # outputs are git-tracked and their inputs come back byte-identical: DVC rightly leaves them be.
    assert _ran(run(["dvc", "repro"], clone).stdout) == set(STAGES) - {"crosscheck", "check_params"}
    assert run(["git", "diff", "--stat", "dvc.lock"], clone).stdout == ""
    changed = {line[3:] for line in run(["git", "status", "--porcelain"], clone).stdout.splitlines()}
    assert all(path.startswith("reports/runtime/") for path in changed), changed  # seconds and host facts
    assert _artifacts(clone) == _artifacts(root)
    assert len(_artifacts(root)) > 20


def test_second_repro_reruns_nothing_and_param_change_reruns_from_sensitivity(repo):
    root, _ = repo
    assert _planned(root, probe=False) == set()
    assert _ran(run(["dvc", "repro"], root).stdout) == set()
    before = {rel: _digest(root, rel) for rel in OUTPUTS[:5]}
    report_before = _digest(root, "reports/sensitivity/op_sensitivity.json")
    _set_params(root, sensitivity={"tolerable_loss": 0.5})
    check_before = _digest(root, "reports/sensitivity/crosscheck.json")
    out = run(["dvc", "repro"], root).stdout
    # Both passes rerun (and the params check, first); their outputs come back byte-identical,
    # so nothing downstream reruns.
    assert _ran(out) == {"check_params", "sensitivity", "crosscheck"}
    assert _digest(root, "reports/sensitivity/crosscheck.json") == check_before
    assert {rel: _digest(root, rel) for rel in OUTPUTS[:5]} == before
    params = json.loads(run(["dvc", "params", "diff", "--json"], root).stdout)["params.yaml"]
    assert (params["sensitivity.tolerable_loss"]["old"], params["sensitivity.tolerable_loss"]["new"]) == (
        0.99,
        0.5,
    )
    # The criterion does not enter a forced pass: same MSE values bit for bit, only timings move,
    # and they move in the runtime file, not in a stage's output.
    metrics = json.loads(run(["dvc", "metrics", "diff", "--json"], root).stdout)
    assert "seconds" in metrics["reports/runtime/sensitivity.json"]
    assert "reports/sensitivity/metrics.json" not in metrics
    assert "reports/sensitivity/agreement.json" not in metrics
    assert _digest(root, "reports/sensitivity/op_sensitivity.json") == report_before
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "looser criterion"], root)


def test_fallback_param_change_reruns_only_what_reads_the_keep_list(repo):
    """fallback.* reruns the keep-list, its validation and the report that shows it; nothing upstream."""
    root, _ = repo
    upstream = {
        rel: _digest(root, rel) for rel in ("reports/validation/curve.json", "reports/rank/scores.csv")
    }
    _set_params(  # split groups: no runtime that fuses them (params refuse compressed_tensors then)
        root,
        fallback={"policy": "top_k", "top_k": {"k": 5}, "always_keep": [], "fused_groups": False},
        quantize={"targets": []},
    )
    changed = {"check_params", "fallback_list", "validate", "rank_report"}
    assert _planned(root, probe=False) == changed
    assert _ran(run(["dvc", "repro"], root).stdout) == changed
    # the removed target's outputs, which DVC leaves on disk when a stage goes away
    for leftover in ("models/quantized", "reports/deploy", *(root / "reports/quantize").glob("*.json")):
        path = root / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert {rel: _digest(root, rel) for rel in upstream} == upstream
    doc = json.loads((root / "reports/fallback/fallback_ops.json").read_text())
    assert [o["rank"] for o in doc["ops"]] == [1, 2, 3, 4, 5]
    inc = json.loads((root / "reports/fallback/inc_op_name_dict.json").read_text())
    assert list(inc) == [inc_pattern(o["module"]) for o in doc["ops"]]
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], root).stdout)
    assert diff["reports/fallback_metrics.json"]["kept"]["new"] == 5
    assert (
        diff["reports/validation/metrics.json"]["kl_kept"]["new"]
        != diff["reports/validation/metrics.json"]["kl_kept"]["old"]
    )
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "top 5"], root)


def test_a_new_scheme_runs_only_its_stage_and_the_two_that_compare(repo):
    """schemes.run is no param of the scheme stages: adding one runs it alone, plus what reads the list."""
    root, _ = repo
    data = yaml.safe_load((root / "params.yaml").read_text())
    keep_list = _digest(root, "reports/fallback/fallback_ops.json")
    _set_params(root, schemes={"run": [*data["schemes"]["run"], "inc_cpu"]})
    assert _ran(run(["dvc", "repro"], root).stdout) == {
        "check_params",
        "scheme_sensitivity@inc_cpu",
        "fallback_list",
        "rank_report",
    }
    assert _digest(root, "reports/fallback/fallback_ops.json") == keep_list  # validate stays cached
    doc = json.loads((root / "reports/rank/schemes.json").read_text())
    native_inc = [p for p in doc["pairs"] if (p["a"], p["b"]) == ("inc_cpu", "inc_cpu (native)")]
    assert [p["spearman"] for p in native_inc] == [1.0, 1.0]  # native inc_cpu is INC's, to the bit
    exports = json.loads((root / "reports/fallback/exports.json").read_text())
    assert exports["inc_op_name_dict.json"]["path"] == "reports/schemes/inc_cpu/op_sensitivity.json"
    assert exports["ort_nodes_to_exclude.json"]["scheme"] == "ort_qdq"
    assert "Deployment schemes" in (root / "reports/op_sensitivity.md").read_text()
    metrics = json.loads((root / "reports/rank/summary.json").read_text())["schemes"]
    assert set(metrics["all_int8_mse"]) == {"inc_cpu", *data["schemes"]["run"], "inc_cpu (native)"}
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "inc_cpu natively too"], root)


def test_a_new_onnx_export_reruns_only_the_fallback_stage(repo):
    """fallback.onnx_model is always a dep (data/onnx by default): a new graph there is new input."""
    root, _ = repo
    import onnx
    from onnx import TensorProto, helper

    # one node per module the ORT export keeps (a kept module without one is an error)
    before = json.loads((root / "reports/fallback/ort_nodes_to_exclude.json").read_text())
    names = [prefix + "MatMul" for prefix in before["node_name_prefixes"]]
    assert names and len(names) == len(before["module_names"])
    node = names[0]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], [f"y{i}"], name=n) for i, n in enumerate(names)],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 2]) for n in ("x", "w")],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [2, 2]) for i in range(len(names))],
    )
    onnx.save(helper.make_model(graph), root / "data/onnx/model.onnx")
    assert "fallback_list" in run(["dvc", "status"], root).stdout
    assert _ran(run(["dvc", "repro"], root).stdout) == {"check_params", "fallback_list"}
    ort = json.loads((root / "reports/fallback/ort_nodes_to_exclude.json").read_text())
    assert ort["onnx_model"] == "data/onnx/model.onnx" and node in ort["nodes_to_exclude"]
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "onnx export"], root)


def test_adding_a_target_runs_only_its_stage_and_the_report(repo):
    """quantize.targets is no param of a quantize stage: a new target runs alone, then the report.
    (fallback.fused_groups is false here: ort_qdq and inc do not fuse, so they take a split list.)"""
    root, _ = repo
    before = _artifacts(root)
    _set_params(root, quantize={"targets": ["ort_qdq"]})
    first = {"check_params", "quantize@ort_qdq", "rank_report"}
    assert _planned(root, probe=False) == first
    assert _ran(run(["dvc", "repro"], root).stdout) == first
    _set_params(root, quantize={"targets": ["ort_qdq", "inc"]})
    assert _ran(run(["dvc", "repro"], root).stdout) == {"check_params", "quantize@inc", "rank_report"}
    report = ("reports/op_sensitivity.md", "reports/plots", "reports/rank")  # rank_report's outputs
    after = _artifacts(root)
    assert {k: after[k] for k in before if not k.startswith(report)} == {
        k: v for k, v in before.items() if not k.startswith(report)
    }
    exports = json.loads((root / "reports/fallback/exports.json").read_text())
    for export, target in (("ort_nodes_to_exclude.json", "ort_qdq"), ("inc_op_name_dict.json", "inc")):
        pointer = exports[export]["deployed_by"]
        doc = json.loads((root / pointer["document"]).read_text())
        assert pointer["artifact"] == doc["artifact"]["path"] == f"models/quantized/{target}"
        assert (root / pointer["artifact"]).is_dir() and doc["quantized"] > 0
        source = json.loads((root / pointer["artifact"] / "op_sensitivity_source.json").read_text())
        assert (source["keep_list"], source["spectrum"]) == (
            doc["artifact"]["keep_list"],
            doc["artifact"]["spectrum"],
        )
        assert len(source["quantize"]) == doc["quantized"] and source["keep"] == doc["kept"]
    section = (root / "reports/op_sensitivity.md").read_text().split("## Deployment\n")[1]
    assert "| ort_qdq | onnx-qdq |" in section and "| inc | inc-pytorch-fx |" in section
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], root).stdout)
    shown = {path for entry in metrics.values() for path in entry.get("data", {})}
    assert {"reports/deploy/ort_qdq.json", "reports/deploy/inc.json"} <= shown
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "two targets"], root)


def test_a_bad_param_or_path_stops_dvc_repro_before_any_output_is_deleted(repo):
    """check_params runs first: a bad value stops a bare `dvc repro` while every other stage's
    outputs are intact; `make restore` brings back its own stamp, which DVC removed."""
    root, _ = repo
    stamp = "reports/params_check.json"
    before = _artifacts(root)
    _set_params(root, fallback={"policy": "best"})
    failed = run(["dvc", "repro"], root, check=False)
    assert failed.returncode != 0 and _ran(failed.stdout) == {"check_params"}
    assert "error: params.yaml: fallback.policy: expected one of top_k" in failed.stderr + failed.stdout
    assert {k: v for k, v in _artifacts(root).items() if k != stamp} == {
        k: v for k, v in before.items() if k != stamp
    }
    run(["git", "checkout", "--", "params.yaml"], root)
    _set_params(root, model={"input": 5})  # a path param that is no string: DVC itself must not crash
    status = run(["dvc", "status"], root, check=False)
    assert status.returncode == 0 and "unexpected error" not in status.stderr, status.stderr
    failed = run(["dvc", "repro"], root, check=False)
    assert failed.returncode != 0 and _ran(failed.stdout) == {"check_params"}
    assert "error: params.yaml: model.input: expected a string" in failed.stderr + failed.stdout
    run(["git", "checkout", "--", "params.yaml"], root)
    _set_params(root, captions={"annotations": "data/missing.json"})
    check = run(["python", "scripts/check_params.py", "params.yaml"], root, check=False)
    assert (
        check.returncode == 2
        and "params.yaml: captions.annotations: data/missing.json is not a file" in check.stderr
    )
    failed = run(["dvc", "repro"], root, check=False)
    assert failed.returncode != 0 and (root / "data/calibration/manifest.jsonl").is_file()
    run(["git", "checkout", "--", "params.yaml"], root)
    run(["make", "restore", f"VENV={Path(sys.executable).parents[1]}"], root)
    assert _artifacts(root) == before
    assert json.loads(run(["dvc", "status", "--json"], root).stdout) == {}


def test_push_clone_pull_gives_identical_artifacts(repo, tmp_path):
    root, _ = repo
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-f", "-d", "e2e", str(remote)], root)
    run(["dvc", "push"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "pipeline run"], root)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path)
    run(["dvc", "pull"], clone)
    status = run(["dvc", "status", "--json"], clone).stdout
    assert json.loads(status) == {}
    for rel in OUTPUTS:
        assert _digest(clone, rel) == _digest(root, rel)


def test_bad_input_fails_stage_with_clear_error_and_no_output(repo, tmp_path):
    root, _ = repo
    work = tmp_path / "bad"
    shutil.copytree(root, work, ignore=shutil.ignore_patterns(".dvc"))
    _set_params(work, captions={"count": 999})
    proc = run(["python", "stages/prepare_captions.py", "--out", "data/fresh"], work, check=False)
    assert proc.returncode == 2
    assert "error: params.yaml: captions.count: expected at most 20" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (work / "data/fresh").exists()


def test_dvc_exp_run_on_a_fallback_param_reruns_only_what_reads_the_keep_list(repo):
    """An experiment on fallback.* (dvc exp run -S): the keep-list, its validation, the targets that
    deploy it (ort_qdq and inc, added above) and the report, nothing upstream (fallback_list now reads
    the model and the splits, which do not change)."""
    root, _ = repo
    upstream = {rel: _digest(root, rel) for rel in OUTPUTS[:4]}
    out = run(["dvc", "exp", "run", "-S", "fallback.top_k.k=3", "-S", "fallback.policy=top_k"], root).stdout
    deploy = {"quantize@ort_qdq", "quantize@inc"}
    assert _ran(out) == {"check_params", "fallback_list", "validate", *deploy, "rank_report"}
    assert {rel: _digest(root, rel) for rel in upstream} == upstream
    assert json.loads((root / "reports/fallback_metrics.json").read_text())["kept"] >= 3
