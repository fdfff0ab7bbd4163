"""The real DAG with real DVC in a throwaway copy of the repo, on a local snapshot laid out as the
published Qwen2.5-VL checkpoints are (``model.source: hf_dir``, bf16 shards with their index; the
embedded default's tiny source is what CI's ``make repro`` runs): repro, no-op rerun, partial
reruns under the default params, a fresh clone's repro giving the same bytes and lock, push /
clone / pull round trip, and a bad-input stage failure.

Every test starts from the first run's commit (:func:`at_base`: git reset, ``dvc checkout``), so
the tests hold in any order (``pytest -p random_order`` style: pass the node ids shuffled)."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from op_sensitivity.fallback.exports import inc_pattern
from op_sensitivity.params_trace import ENV as TRACE_ENV
from tests.helpers import REPO, copy_repo, make_snapshot, run, venv_env

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
    "models/qwen2_5_vl/op_sensitivity_model.json",
    "reports/model/op_inventory.json",
    "reports/sensitivity/op_sensitivity.json",
    "reports/op_sensitivity.md",
    "reports/plots/spectrum.png",
    "reports/fallback/fallback_ops.json",
    "reports/fallback/inc_op_name_dict.json",
)


def _ran(output: str) -> set[str]:
    """The stages DVC reproduced: run, or restored from its run cache (a test that repeats another
    test's params, in any order, finds them there). DVC's lines, or under ``scripts/repro.py``
    (``make repro``, which drops them) each stage's summary line."""
    dvc = re.findall(r"(?:Running stage|Stage) '([^']+)'(?:| is cached)(?=:| -|$)", output, re.M)
    return {*dvc, *re.findall(r" op_sensitivity\.stage INFO (\S+) done in ", output)}


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
def repo(tmp_path_factory, small_model_dir):
    """The first run, committed: the base every test starts from. Its ``dvc repro`` records which
    params fields each stage reads (``params_trace``) into ``<repo>/../params-reads``."""
    base = tmp_path_factory.mktemp("e2e")
    snapshot = make_snapshot(small_model_dir, base / "Qwen2.5-VL-3B-Instruct")
    repo = copy_repo(base / "repo")
    (repo / "dvc.lock").unlink(missing_ok=True)
    data = yaml.safe_load((repo / "params.yaml").read_text())
    data["captions"]["count"] = 4
    data["model"].update(source="hf_dir", input=str(snapshot))
    data["sensitivity"]["confidence_batches"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    run(["git", "commit", "-qam", "small params, a local snapshot"], repo)
    # make repro's two commands: the plan, then dvc repro through scripts/repro.py
    planned = run([sys.executable, "scripts/check_params.py"], repo)
    plan = planned.stdout + planned.stderr
    assert _plan_stages(planned.stdout) == set(STAGES)  # a fresh clone: every stage, as DVC runs them next
    reads = base / "params-reads"
    reads.mkdir()
    first = run(
        [sys.executable, "scripts/repro.py"],
        repo,
        env={TRACE_ENV: str(reads), "OP_SENSITIVITY_VERBOSE": ""},
        keep_cr=True,
    )
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "first run"], repo)
    run(["git", "tag", "base"], repo)
    return repo, plan + first.stdout + first.stderr


def _snapshot(root: Path) -> str:
    return yaml.safe_load((root / "params.yaml").read_text())["model"]["input"]


def at_base(repo) -> Path:
    """The repo as the first run left it: params, lock and tracked metrics from its commit, every
    cached output checked out, nothing pending; what a test changed is gone."""
    root, _ = repo
    run(["git", "reset", "-q", "--hard", "base"], root)
    run(["git", "clean", "-qfd"], root)
    run(["dvc", "checkout", "--force", "-q"], root)
    assert json.loads(run(["dvc", "status", "--json"], root).stdout) == {}
    return root


def _planned(root, probe: bool = True) -> set[str]:
    """The stages `make repro`'s plan lists (scripts/check_params.py reads DVC's status)."""
    out = run([sys.executable, "scripts/check_params.py", *([] if probe else ["--no-probe"])], root).stdout
    return _plan_stages(out)


def _plan_stages(out: str) -> set[str]:
    names = {line.split()[0] for line in out.splitlines() if line.split()}
    if "nothing to run: every stage is up to date" in out:
        return set()
    return names & set(STAGES)


# what DVC itself prints at the end of a run (a fresh dvc.lock: the git hint too)
DVC_HINTS = {
    "Use `dvc push` to send your updates to remote storage.",
    *("To track the changes with git, run:", "git add dvc.lock"),
    *("To enable auto staging, run:", "dvc config core.autostage true"),
}


def test_make_repros_terminal_is_the_plan_and_one_line_per_stage(repo):
    """What `make repro` shows: the plan, then one summary line per stage (progress bars erase
    themselves), DVC's closing hint, no warning; everything else went to logs/<stage>.log."""
    _, output = repo
    shown = [line.rsplit("\r", 1)[-1] for line in output.split("\n")]  # what a terminal keeps of a line
    shown = [line for line in shown if line.strip()]
    summaries = [line for line in shown if " op_sensitivity.stage INFO " in line]
    assert len(summaries) == len(STAGES) + 1  # check_params twice: make repro's plan, then its stage
    after_plan = shown[shown.index(summaries[0]) + 1 :]
    assert {line.strip() for line in after_plan if line not in summaries} <= DVC_HINTS
    assert all(re.search(r" done in [\d.]+ s(: .+)?; full log: logs/\S+\.log$", line) for line in summaries)
    assert not [line for line in shown if "warn" in line.lower()]
    assert len(shown) <= 60


def test_repro_runs_all_stages_and_writes_both_phases(repo):
    _, stdout = repo
    root = at_base(repo)
    assert _ran(stdout) == set(STAGES)
    report = json.loads((root / "reports/sensitivity/op_sensitivity.json").read_text())
    inventory = json.loads((root / "reports/model/op_inventory.json").read_text())
    n_ops = len(inventory["ops"])
    assert n_ops == 17  # 1 Conv3d + 5 + 2 merger (vision), Embedding + 7 (text), lm_head
    for phase in ("fallback", "requant"):
        ops = report["phases"][phase]["ops"]
        assert len(ops) == n_ops  # every op scored, Conv3d included
        assert all(isinstance(o["mse"], float) and o["mse"] >= 0 for o in ops)
    assert report["metadata"]["measured_at"] == "lm_head"
    assert report["metadata"]["calibration"]["samples_used"] == 1
    model = report["metadata"]["model"]  # the snapshot's, loaded from where it lies
    assert (model["source"], model["random_weights"], model["origin"]) == ("hf_dir", False, _snapshot(root))
    assert not list((root / "models/qwen2_5_vl").glob("*.safetensors"))  # the snapshot is never copied
    for target in yaml.safe_load((root / "params.yaml").read_text())["quantize"]["targets"]:
        deployed = json.loads((root / f"reports/deploy/{target}.json").read_text())
        assert deployed["kl_kept"] > 0 and deployed["size_mb"] > 0, target  # measured in its runtime
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
    assert runtime["engine"] == "native" and runtime["seconds"]["fallback"] > 0
    # the default's crosscheck: both engines on the carved copy, the first confidence batch
    passes = json.loads((root / "reports/runtime/crosscheck.json").read_text())["passes"]
    assert [(p["engine"], p["model"], p["batches"]) for p in passes] == [
        ("native", "carved", 1),
        ("inc", "carved", 1),
    ]
    crosscheck = json.loads((root / "reports/sensitivity/crosscheck.json").read_text())
    assert crosscheck["compared"]["model"] == "carved" and crosscheck["passes_bar"] is True
    for phase in ("fallback", "requant"):
        assert crosscheck["phases"][phase]["max_rel_diff"] == 0.0  # INC's values to the bit


HEADLINE = {
    *("ops", "int8_mse", "engine_rho", "kept", "bits", "seconds", "peak_gib", "top_same"),
}


def test_dvc_metrics_are_the_headline_numbers_and_fit_210_columns(repo):
    """Per-op names, configuration and strings stay in the artifacts (docs/artifacts.md)."""
    root = at_base(repo)
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
    root = at_base(repo)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path)
    # No cache: every stage with a cached output recomputes it. crosscheck's and check_params'
    # outputs are git-tracked and their inputs come back byte-identical: DVC rightly leaves them be,
    # and make repro's DVC call (scripts/repro.py) names them in one line, as its last.
    out = run([sys.executable, "scripts/repro.py"], clone, env={"OP_SENSITIVITY_VERBOSE": ""})
    assert _ran(out.stdout + out.stderr) == set(STAGES) - {"crosscheck", "check_params"}
    assert out.stdout.strip().splitlines()[-1] == (
        "not rerun, inputs as dvc.lock records them (the committed outputs stand): check_params, crosscheck"
    )
    assert run(["git", "diff", "--stat", "dvc.lock"], clone).stdout == ""
    changed = {line[3:] for line in run(["git", "status", "--porcelain"], clone).stdout.splitlines()}
    assert all(path.startswith("reports/runtime/") for path in changed), changed  # seconds and host facts
    assert _artifacts(clone) == _artifacts(root)
    assert len(_artifacts(root)) > 20


def test_second_repro_reruns_nothing_and_param_change_reruns_from_sensitivity(repo):
    root = at_base(repo)
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
    """Under the default params (every quantize target): fallback.* reruns the keep-lists, the main
    list's validation, every target deploying a list and the report that shows them; nothing upstream."""
    root = at_base(repo)
    upstream = {
        rel: _digest(root, rel) for rel in ("reports/validation/curve.json", "reports/rank/scores.csv")
    }
    targets = yaml.safe_load((root / "params.yaml").read_text())["quantize"]["targets"]
    assert targets == yaml.safe_load((REPO / "params.yaml").read_text())["quantize"]["targets"]
    _set_params(root, fallback={"policy": "top_k", "top_k": {"k": 3}, "always_keep": []})
    changed = {
        *("check_params", "fallback_list", "validate", "rank_report"),
        *(f"quantize@{t}" for t in targets),
    }
    assert _planned(root, probe=False) == changed
    assert _ran(run(["dvc", "repro"], root).stdout) == changed
    assert {rel: _digest(root, rel) for rel in upstream} == upstream
    doc = json.loads((root / "reports/fallback/fallback_ops.json").read_text())
    assert [o["rank"] for o in doc["ops"]][:3] == [1, 2, 3]  # the top 3, and their fused groups' members
    inc = json.loads((root / "reports/fallback/inc_op_name_dict.json").read_text())
    assert list(inc) == [inc_pattern(o["module"]) for o in doc["ops"]]
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], root).stdout)
    assert diff["reports/fallback_metrics.json"]["kept"]["new"] == len(doc["ops"])
    assert (
        diff["reports/validation/metrics.json"]["kl_kept"]["new"]
        != diff["reports/validation/metrics.json"]["kl_kept"]["old"]
    )
    for target in targets:  # each artifact rebuilt from its scheme's new list
        document = json.loads((root / f"reports/quantize/{target}.json").read_text())
        source = json.loads((root / f"models/quantized/{target}/op_sensitivity_source.json").read_text())
        assert source["keep"] == document["kept"]


def test_a_new_scheme_runs_only_its_stage_and_what_reads_the_scheme_directories(repo):
    """schemes.run is no param of the scheme stages: adding one runs it alone, then fallback_list
    and the report, which compare the schemes, and, under the default params, every quantize target:
    their deps are the whole reports/schemes and reports/fallback/schemes directories (dvc.yaml's
    templating cannot name a target's scheme; docs/dvc.md)."""
    root = at_base(repo)
    data = yaml.safe_load((root / "params.yaml").read_text())
    keep_list = _digest(root, "reports/fallback/fallback_ops.json")
    _set_params(root, schemes={"run": [*data["schemes"]["run"], "inc_cpu"]})
    assert _ran(run(["dvc", "repro"], root).stdout) == {
        "check_params",
        "scheme_sensitivity@inc_cpu",
        "fallback_list",
        *(f"quantize@{t}" for t in data["quantize"]["targets"]),
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
    root = at_base(repo)
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
    """quantize.targets is no param of a quantize stage: a target added to params that never had it
    (no lock entry, no outputs) runs alone, then the report."""
    root = at_base(repo)
    targets = yaml.safe_load((root / "params.yaml").read_text())["quantize"]["targets"]
    new = "ort_qdq"
    _set_params(root, quantize={"targets": [t for t in targets if t != new]})
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    del lock["stages"][f"quantize@{new}"]
    (root / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    for rel in (f"models/quantized/{new}", f"reports/quantize/{new}.json", f"reports/deploy/{new}.json"):
        path = root / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert _ran(run(["dvc", "repro"], root).stdout) == {"check_params", "rank_report"}
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", f"no {new}"], root)
    before = _artifacts(root)
    _set_params(root, quantize={"targets": targets})
    first = {"check_params", f"quantize@{new}", "rank_report"}
    assert _planned(root, probe=False) == first
    assert _ran(run(["dvc", "repro"], root).stdout) == first
    report = ("reports/op_sensitivity.md", "reports/plots", "reports/rank")  # rank_report's outputs
    after = _artifacts(root)
    assert {k: after[k] for k in before if not k.startswith(report)} == {
        k: v for k, v in before.items() if not k.startswith(report)
    }
    exports = json.loads((root / "reports/fallback/exports.json").read_text())
    pointer = exports["ort_nodes_to_exclude.json"]["deployed_by"]
    doc = json.loads((root / pointer["document"]).read_text())
    assert pointer["artifact"] == doc["artifact"]["path"] == f"models/quantized/{new}"
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
    assert {f"reports/deploy/{t}.json" for t in targets} <= shown


def test_a_bad_param_or_path_stops_dvc_repro_before_any_output_is_deleted(repo):
    """check_params runs first: a bad value stops a bare `dvc repro` while every other stage's
    outputs are intact; `make restore` brings back its own stamp, which DVC removed."""
    root = at_base(repo)
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
    root = at_base(repo)
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
    root = at_base(repo)
    work = tmp_path / "bad"
    shutil.copytree(root, work, ignore=shutil.ignore_patterns(".dvc"))
    _set_params(work, captions={"count": 999})
    proc = run(["python", "stages/prepare_captions.py", "--out", "data/fresh"], work, check=False)
    assert proc.returncode == 2
    assert "error: params.yaml: captions.count: expected at most 20" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (work / "data/fresh").exists()


def test_dvc_exp_run_on_a_fallback_param_reruns_only_what_reads_the_keep_list(repo):
    """An experiment on fallback.* (dvc exp run -S) under the default params: the keep-lists, the
    main list's validation, every target deploying a list and the report, nothing upstream."""
    root = at_base(repo)
    upstream = {rel: _digest(root, rel) for rel in OUTPUTS[:4]}
    out = run(["dvc", "exp", "run", "-S", "fallback.top_k.k=3", "-S", "fallback.policy=top_k"], root).stdout
    targets = yaml.safe_load((root / "params.yaml").read_text())["quantize"]["targets"]
    deploy = {f"quantize@{t}" for t in targets}
    assert _ran(out) == {"check_params", "fallback_list", "validate", *deploy, "rank_report"}
    assert {rel: _digest(root, rel) for rel in upstream} == upstream
    assert json.loads((root / "reports/fallback_metrics.json").read_text())["kept"] >= 3


# Fields a stage reads that cannot change what it writes (``dataclasses.replace`` reads every field
# of the block it copies): processes / suffix_reuse give the same bytes (tests/engines/
# test_distributed.py, test_reuse.py); tolerable_loss is INC's accuracy criterion, which a forced pass
# ignores (test_second_repro_... above: the same bytes); engine picks the main pass's engine, and the
# scheme and quantize stages compute natively whatever it says. params_file is where the values came
# from, not a value.
VALUE_NEUTRAL = {
    "sensitivity.native.processes",
    "sensitivity.native.suffix_reuse",
    "sensitivity.tolerable_loss",
    "sensitivity.engine",
}
MODEL_FIELDS = {
    "model.min_pixels": "model.processor.min_pixels",
    "model.max_pixels": "model.processor.max_pixels",
}


def _stage_of(record: dict) -> str:
    """The dvc.yaml stage a traced process ran: its script, and its foreach item."""
    name, argv = record["script"].removesuffix(".py"), record["argv"]
    item = lambda flag: argv[argv.index(flag) + 1]  # noqa: E731
    if name == "sensitivity" and "--scheme" in argv:
        return f"scheme_sensitivity@{item('--scheme')}"
    if name == "quantize":
        return f"quantize@{item('--target')}"
    return name


def test_every_params_field_a_stage_reads_is_a_dvc_param_of_it(repo):
    """dvc.yaml's params lists, derived from what the code reads: the first run recorded, through
    the params models, each field each stage read (op_sensitivity.params_trace); every one must be
    under a key DVC hashes for that stage (dvc.lock lists them resolved), or DVC would keep a stale
    artifact when it changes."""
    root = at_base(repo)
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    records = [json.loads(p.read_text()) for p in sorted((root.parent / "params-reads").glob("*.json"))]
    stages = {_stage_of(r): r for r in records}
    assert set(stages) == set(STAGES)  # every stage of the run recorded its reads
    missing = {}
    for stage, record in stages.items():
        listed = set(lock[stage].get("params", {}).get("params.yaml", {}))
        for read in record["reads"]:
            key = MODEL_FIELDS.get(read, read)
            if key == "fallback.settings":  # the chosen policy's own block
                key = f"fallback.{params['fallback']['policy']}"
            if key.endswith(".params_file") or key in VALUE_NEUTRAL:
                continue
            if not any(key == k or key.startswith(k + ".") for k in listed):
                missing.setdefault(stage, []).append(key)
    assert missing == {}
    assert "sensitivity.native.screening" in stages["scheme_sensitivity@ort_qdq"]["reads"]


def _stage_pids(root: Path, script: str) -> list[int]:
    """Live processes running ``script`` in ``root`` (their cmdline and working directory)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            here = os.readlink(proc / "cwd")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, ValueError, IndexError):
            continue
        if here == str(root) and script.encode() in cmdline and state not in ("Z", "X"):
            pids.append(int(proc.name))
    return pids


def test_killing_dvc_repro_stops_the_stage_it_was_running(repo, tmp_path):
    """kill -9 of `dvc repro` (what a closed terminal or a CI timeout does) ends the stage command
    it started, instead of leaving it to run on its own (op_sensitivity.lifetime); the stage unwinds
    as on a SIGTERM of its own: no temporary output beside its outputs."""
    root = at_base(repo)
    _set_params(root, sensitivity={"tolerable_loss": 0.42})  # sensitivity reruns: an INC pass
    log = tmp_path / "dvc.log"
    with log.open("w") as out:
        dvc = subprocess.Popen(
            ["dvc", "repro", "--no-run-cache", "sensitivity"],
            cwd=root,
            env=venv_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 300
        while "op_sensitivity.engines" not in log.read_text():  # the stage is inside its pass
            assert dvc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        stages = _stage_pids(root, "stages/sensitivity.py")
        assert stages, log.read_text()[-2000:]
        dvc.send_signal(signal.SIGKILL)
        dvc.wait()
        deadline = time.monotonic() + 30
        while _stage_pids(root, "stages/sensitivity.py") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _stage_pids(root, "stages/sensitivity.py") == [], "the stage outlived dvc repro"
    finally:
        for pid in _stage_pids(root, "stages/sensitivity.py"):
            os.kill(pid, signal.SIGKILL)
    # stopped, not finished: DVC removed the output before starting the stage, which never wrote it
    assert not (root / "reports/sensitivity/op_sensitivity.json").exists()
    assert not list((root / "reports/sensitivity").glob(".*.tmp-*"))


def _python_blocks(doc: Path, section: str) -> list[str]:
    """The ```python blocks of one ``## section`` of a Markdown page, in order."""
    text = doc.read_text()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end != -1 else None], re.S)


def test_the_deploy_docs_keep_list_snippets_run_as_written_on_the_outputs(repo):
    """Each block in a fresh interpreter from the run's root; what it built is the run's export."""
    root = at_base(repo)
    section = "Feeding a keep-list to your own quantizer call"
    inc, modelopt, recipe = _python_blocks(REPO / "docs/deploy.md", section)
    fallback = root / "reports/fallback"

    def value(block: str, expr: str):
        out = run([sys.executable, "-c", f"{block}\nimport json as _j\nprint(_j.dumps({expr}))"], root)
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert value(inc, "conf.op_name_dict") == json.loads((fallback / "inc_op_name_dict.json").read_text())
    extra = json.loads((fallback / "modelopt_quant_cfg.json").read_text())["quant_cfg"]
    assert extra and value(modelopt, "cfg['quant_cfg'][-len(extra):]") == extra
    ignore = json.loads((fallback / "llmcompressor_ignore.json").read_text())["ignore"]
    assert ignore and value(recipe, "ignore") == ignore
