"""Bad params, bad files and killed runs, through the real stage scripts.

Every case runs a stage script (in this process with ``runpy``, exactly as ``python stages/x.py``
runs it, minus the interpreter start) inside a workspace that already holds a complete good run,
and asserts: exit code 2, one ``error:`` line naming the param or file and what was expected, no
traceback, and not one byte of the previous outputs changed, no stray temporary left. The kill
cases use real subprocesses and real signals.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from op_sensitivity.atomic import TMP_TAG, atomic_dir
from op_sensitivity.report.comparison import crosscheck
from tests.helpers import REPO, SAMPLE_ANNOTATIONS, SAMPLE_IMAGES, SMALL_TINY, run_script, venv_env

STAGES = REPO / "stages"
FP32 = {"weight": {"dtype": ["fp32"]}, "activation": {"dtype": ["fp32"]}}


def good_params() -> dict:
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["captions"].update(annotations=str(SAMPLE_ANNOTATIONS), images_dir=str(SAMPLE_IMAGES), count=4)
    data["model"]["tiny"].update(copy.deepcopy(SMALL_TINY))
    data["sensitivity"].update(engine="native", confidence_batches=1)
    return data


PIPELINE = (
    ("prepare_captions", []),
    ("load_model", []),
    ("sensitivity", ["--runtime", "reports/runtime/sensitivity.json"]),
    ("curve", []),
    ("fallback_list", []),
    ("validate", []),
    (
        "rank_report",
        [
            "--crosscheck",
            "reports/sensitivity/crosscheck.json",
            "--validation",
            "reports/validation/section.md",
        ],
    ),
)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A complete good run of every stage (native engine; crosscheck.json compares it with itself)."""
    ws = tmp_path_factory.mktemp("ws")
    (ws / "params.yaml").write_text(yaml.safe_dump(good_params(), sort_keys=False))
    (ws / "data/onnx").mkdir(parents=True)
    for stage, extra in PIPELINE:
        if stage == "rank_report":
            report = json.loads((ws / "reports/sensitivity/op_sensitivity.json").read_text())
            (ws / "reports/sensitivity/crosscheck.json").write_text(json.dumps(crosscheck(report, report)))
        code, err = run_script(STAGES / f"{stage}.py", extra, ws)
        assert code == 0, err
    return ws


def snapshot(ws: Path) -> dict[str, tuple[str, int]]:
    """Every file the stages own, with content hash and mode (scratch, logs, case inputs left out)."""
    skip = {"bad", "case.yaml", ".op_sensitivity_work", "logs"}
    return {
        str(p.relative_to(ws)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
        for p in sorted(ws.rglob("*"))
        if p.is_file() and not skip & set(p.relative_to(ws).parts)
    }


def strays(ws: Path) -> list[str]:
    return [str(p.relative_to(ws)) for p in ws.rglob(f"*{TMP_TAG}*")]


@dataclass
class Case:
    id: str
    stage: str
    expected: str  # a substring of the one error line
    params: Callable[[dict], None] | None = None  # mutates a copy of the good params (written to case.yaml)
    files: Callable[[Path, Path], list[str]] | None = None  # (workspace, bad dir) -> extra stage args
    args: list[str] = field(default_factory=list)
    names_params_file: bool = True  # the message starts with case.yaml


def _set(block: str, **values) -> Callable[[dict], None]:
    return lambda d: d[block].update(values)


def _snapshot_copy(ws: Path, bad: Path, breaks: Callable[[Path], None]) -> Path:
    """A copy of the good model directory as an HF snapshot, broken by ``breaks``."""
    snap = bad / "snapshot"
    shutil.copytree(ws / "models/qwen2_5_vl", snap)
    (snap / "op_sensitivity_model.json").unlink()
    breaks(snap)
    return snap


def _hf(breaks: Callable[[Path], None]) -> Callable[[Path, Path], list[str]]:
    def setup(ws: Path, bad: Path) -> list[str]:
        snap = _snapshot_copy(ws, bad, breaks)
        data = yaml.safe_load((ws / "case.yaml").read_text())
        data["model"].update(source="hf_dir", input=str(snap))
        (ws / "case.yaml").write_text(yaml.safe_dump(data))
        return []

    return setup


def _truncate(n: int) -> Callable[[Path], None]:
    return lambda snap: os.truncate(snap / "model.safetensors", n)


INSTANCES = {  # an instances file where a captions file belongs
    "images": [{"id": 1, "file_name": "a.jpg"}],
    "annotations": [{"id": 1, "image_id": 1, "bbox": [0, 0, 1, 1]}],
}


def _write(name: str, content: str) -> Callable[[Path, Path], list[str]]:
    def setup(ws: Path, bad: Path) -> list[str]:
        (bad / name).write_text(content)
        return []

    return setup


def _bad_file(name: str, content: str, arg: str) -> Callable[[Path, Path], list[str]]:
    def setup(ws: Path, bad: Path) -> list[str]:
        (bad / name).write_text(content)
        return [arg, str(bad / name)]

    return setup


def _truncated_copy(rel: str, arg: str, keep: int = 40) -> Callable[[Path, Path], list[str]]:
    def setup(ws: Path, bad: Path) -> list[str]:
        target = bad / Path(rel).name
        target.write_bytes((ws / rel).read_bytes()[:keep])
        return [arg, str(target)]

    return setup


def _report_with(mutate: Callable[[dict], None]) -> Callable[[Path, Path], list[str]]:
    def setup(ws: Path, bad: Path) -> list[str]:
        report = json.loads((ws / "reports/sensitivity/op_sensitivity.json").read_text())
        mutate(report)
        (bad / "op_sensitivity.json").write_text(json.dumps(report))
        return ["--sensitivity", str(bad / "op_sensitivity.json")]

    return setup


def _model_copy(breaks: Callable[[Path], None]) -> Callable[[Path, Path], list[str]]:
    """A copy of the good model directory (the tiny source's), broken by ``breaks``."""

    def setup(ws: Path, bad: Path) -> list[str]:
        model = bad / "model"
        shutil.copytree(ws / "models/qwen2_5_vl", model)
        breaks(model)
        return ["--model", str(model)]

    return setup


def _card(content: str) -> Callable[[Path], None]:
    return lambda model: (model / "op_sensitivity_model.json").write_text(content)


def _card_with(**extra) -> Callable[[Path], None]:
    def breaks(model: Path) -> None:
        card = json.loads((model / "op_sensitivity_model.json").read_text())
        (model / "op_sensitivity_model.json").write_text(json.dumps({**card, **extra}))

    return breaks


def _split_copy(split: str, arg: str, breaks: Callable[[Path], None]) -> Callable[[Path, Path], list[str]]:
    """A copy of the good ``data/<split>`` with its first record's image broken by ``breaks``."""

    def setup(ws: Path, bad: Path) -> list[str]:
        copy_dir = bad / split
        shutil.copytree(ws / "data" / split, copy_dir)
        first = json.loads((copy_dir / "manifest.jsonl").read_text().splitlines()[0])
        breaks(copy_dir / first["image"])
        return [arg, str(copy_dir)]

    return setup


def _coco_images(breaks: Callable[[Path], None]) -> Callable[[Path, Path], list[str]]:
    """The sample's COCO images, every one broken by ``breaks`` (captions.images_dir: bad/images)."""

    def setup(ws: Path, bad: Path) -> list[str]:
        shutil.copytree(SAMPLE_IMAGES, bad / "images")
        for image in (bad / "images").iterdir():
            breaks(image)
        return []

    return setup


def _truncate_file(keep: int | None = None) -> Callable[[Path], None]:
    """Cut a file to ``keep`` bytes (None: to half its size)."""
    return lambda path: os.truncate(path, path.stat().st_size // 2 if keep is None else keep)


def _weights(breaks: Callable[[Path], None]) -> Callable[[Path], None]:
    return lambda model: breaks(model / "model.safetensors")


def _json_copy(rel: str, arg: str, mutate: Callable[[dict], None]) -> Callable[[Path, Path], list[str]]:
    """A copy of the good run's JSON artifact ``rel``, changed by ``mutate``."""

    def setup(ws: Path, bad: Path) -> list[str]:
        doc = json.loads((ws / rel).read_text())
        mutate(doc)
        (bad / Path(rel).name).write_text(json.dumps(doc))
        return [arg, str(bad / Path(rel).name)]

    return setup


def _rename_first_op(doc: dict) -> None:
    doc["ops"][0]["name"] = "model.nope"


def _keep_unknown(doc: dict) -> None:
    doc["ops"].insert(0, {**(doc["ops"][0] if doc["ops"] else {}), "module": "model.nope"})


def _onnx_dir(n: int, content: bytes = b"") -> Callable[[Path, Path], list[str]]:
    def setup(ws: Path, bad: Path) -> list[str]:
        for i in range(n):
            (bad / f"m{i}.onnx").write_bytes(content)
        data = yaml.safe_load((ws / "case.yaml").read_text())
        data["fallback"]["onnx_model"] = str(bad / "m0.onnx") if n == 1 else str(bad)
        (ws / "case.yaml").write_text(yaml.safe_dump(data))
        return []

    return setup


def _onnx_graph(*node_names: str) -> Callable[[Path, Path], list[str]]:
    """A valid ONNX graph (one MatMul per name, ``onnx.helper``) as fallback.onnx_model."""

    def setup(ws: Path, bad: Path) -> list[str]:
        import onnx
        from onnx import TensorProto, helper

        nodes = [helper.make_node("MatMul", ["x", "w"], [f"y{i}"], name=n) for i, n in enumerate(node_names)]
        value = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 2]) for n in ("x", "w")]
        outs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [2, 2]) for i in range(len(nodes))]
        onnx.save(helper.make_model(helper.make_graph(nodes, "other", value, outs)), bad / "other.onnx")
        data = yaml.safe_load((ws / "case.yaml").read_text())
        data["fallback"]["onnx_model"] = str(bad / "other.onnx")
        (ws / "case.yaml").write_text(yaml.safe_dump(data))
        return []

    return setup


def _op_name_dict(key: str, cfg: dict | None = None, **sensitivity) -> Callable[[dict], None]:
    def mutate(d: dict) -> None:
        d["sensitivity"].update(op_name_dict={key: cfg or FP32}, **sensitivity)

    return mutate


def _not_nan(report: dict) -> None:
    report["phases"]["fallback"]["ops"][0]["mse"] = float("nan")


CASES = [
    # --- any stage: the params file itself, and blocks another stage reads -----------------
    Case(
        "params-missing",
        "prepare_captions",
        "params file not found",
        args=["--params", "nope.yaml"],
        names_params_file=False,
    ),
    Case(
        "params-not-yaml",
        "prepare_captions",
        "p.yaml: not valid YAML",
        names_params_file=False,
        files=_bad_file("p.yaml", "captions: [unclosed\n", "--params"),
    ),
    Case(
        "report-not-a-mapping",
        "prepare_captions",
        "case.yaml: report: expected a mapping, got str",
        params=lambda d: d.update(report="oops"),
    ),
    Case(
        "fallback-missing",
        "load_model",
        "case.yaml: fallback: expected a mapping",
        params=lambda d: d.pop("fallback"),
    ),
    # --- prepare_captions ---------------------------------------------------------------------
    Case(
        "count-too-large",
        "prepare_captions",
        "case.yaml: captions.count: expected at most 20",
        params=_set("captions", count=999),
    ),
    Case(
        "count-negative",
        "prepare_captions",
        "captions.count: expected an integer >= 1, got -1",
        params=_set("captions", count=-1),
    ),
    Case(
        "count-string",
        "prepare_captions",
        "captions.count: expected an integer, got '8'",
        params=_set("captions", count="8"),
    ),
    Case(
        "mode-unknown",
        "prepare_captions",
        "captions.mode: expected one of image_caption, text_only",
        params=_set("captions", mode="video"),
    ),
    Case(
        "annotations-missing",
        "prepare_captions",
        "annotation file not found",
        params=_set("captions", annotations="bad/none.json"),
        names_params_file=False,
    ),
    Case(
        "annotations-not-json",
        "prepare_captions",
        "bad/captions.json: not valid JSON",
        names_params_file=False,
        params=_set("captions", annotations="bad/captions.json"),
        files=_write("captions.json", "{not json"),
    ),
    Case(
        "annotations-instances",
        "prepare_captions",
        "annotations[0]: expected an object with integer 'id'",
        names_params_file=False,
        params=_set("captions", annotations="bad/captions.json"),
        files=_write("captions.json", json.dumps(INSTANCES)),
    ),
    Case(
        "images-dir-missing",
        "prepare_captions",
        "case.yaml: captions.images_dir: bad/nope is not a directory",
        params=_set("captions", images_dir="bad/nope"),
    ),
    # sweep: a COCO image cut short opens (its header is whole) and fails when decoded
    Case(
        "coco-image-truncated",
        "prepare_captions",
        "does not open as an image",
        params=_set("captions", images_dir="bad/images"),
        files=_coco_images(_truncate_file()),
        names_params_file=False,
    ),
    # --- load_model ----------------------------------------------------------------------------
    Case(
        "hf-dir-legacy-key",
        "load_model",
        "case.yaml: model.hf_dir: replaced by model.input",
        params=lambda d: d["model"].update(hf_dir="data/hf_snapshot"),
    ),
    Case(
        "snapshot-missing",
        "load_model",
        "case.yaml: model.input: /does/not/exist is not a directory",
        params=_set("model", source="hf_dir", input="/does/not/exist"),
    ),
    Case(
        "safetensors-truncated",
        "load_model",
        "model.safetensors: not a readable safetensors file",
        files=_hf(_truncate(50_000)),
        names_params_file=False,
    ),
    Case(
        "safetensors-empty",
        "load_model",
        "model.safetensors: not a readable safetensors file",
        files=_hf(_truncate(0)),
        names_params_file=False,
    ),
    Case(
        "safetensors-garbage",
        "load_model",
        "model.safetensors: not a readable safetensors file",
        files=_hf(lambda s: (s / "model.safetensors").write_bytes(b"garbage" * 999)),
        names_params_file=False,
    ),
    Case(
        "snapshot-other-model",
        "load_model",
        "model_type 'llama', expected 'qwen2_5_vl'",
        files=_hf(lambda s: (s / "config.json").write_text(json.dumps({"model_type": "llama"}))),
        names_params_file=False,
    ),
    Case(
        "tiny-input-not-calibration",
        "load_model",
        "case.yaml: model.input: bad is not a calibration sample",
        params=_set("model", input="bad"),
    ),
    Case(
        "max-pixels-tiny",
        "load_model",
        "case.yaml: model.processor.max_pixels: expected null or >= 784 (one 28x28 merged patch), got 100",
        params=lambda d: d["model"]["processor"].update(min_pixels=None, max_pixels=100),
    ),
    Case(
        "max-pixels-zero",
        "load_model",
        "model.processor.max_pixels: expected null or >= 784 (one 28x28 merged patch), got 0",
        params=lambda d: d["model"]["processor"].update(max_pixels=0),
    ),
    Case(
        "max-pixels-below-default-min",
        "load_model",
        "case.yaml: model.processor.max_pixels: the image processor would resize to at least min_pixels 3136",
        params=lambda d: d["model"]["processor"].update(min_pixels=None, max_pixels=1000),
    ),
    Case(
        "heads-mismatch",
        "load_model",
        "text.hidden_size: expected a multiple",
        params=lambda d: d["model"]["tiny"]["text"].update(num_attention_heads=3),
    ),
    # --- sensitivity ---------------------------------------------------------------------------
    Case(
        "op-name-bad-regex",
        "sensitivity",
        "case.yaml: sensitivity.op_name_dict.model[: expected a module name",
        params=_set("sensitivity", op_name_dict={"model[": FP32}),
    ),
    Case(
        "op-name-bad-shape",
        "sensitivity",
        "case.yaml: sensitivity.op_name_dict.lm_head: expected a mapping",
        params=_set("sensitivity", op_name_dict={"lm_head": {"weight": "fp32"}}),
    ),
    Case(
        "op-type-bad-shape",
        "sensitivity",
        "sensitivity.op_type_dict.Conv3d",
        params=_set("sensitivity", op_type_dict={"Conv3d": "fp32"}),
    ),
    Case(
        "everything-fp32",
        "sensitivity",
        "case.yaml: sensitivity.op_name_dict: every op is kept fp32",
        params=_set("sensitivity", op_name_dict={".*": FP32}),
    ),
    Case(
        "max-ops",
        "sensitivity",
        "case.yaml: sensitivity.max_ops: the pass would score 17 ops",
        params=_set("sensitivity", max_ops=3),
    ),
    Case(
        "too-few-samples",
        "sensitivity",
        "case.yaml: sensitivity.confidence_batches x batch_size = 9 samples",
        params=_set("sensitivity", confidence_batches=9),
    ),
    Case(
        "engine-unknown",
        "sensitivity",
        "sensitivity.engine: expected one of inc, native",
        params=_set("sensitivity", engine="onnx"),
    ),
    Case(
        "loss-range",
        "sensitivity",
        "sensitivity.tolerable_loss: expected a relative loss",
        params=_set("sensitivity", tolerable_loss=2),
    ),
    Case(
        "int8-kernels-bf16",
        "sensitivity",
        "case.yaml: sensitivity.native.arithmetic: int8_kernels runs on cpu",
        params=lambda d: d["sensitivity"]["native"].update(dtype="bfloat16", arithmetic="int8_kernels"),
    ),
    # a quantize target is written from its scheme's keep-list: without that scheme, refused upfront
    Case(
        "quantize-target-scheme",
        "prepare_captions",
        "case.yaml: quantize.targets: compressed_tensors is written from the llmcompressor_w8a8 keep-list",
        params=lambda d: d["schemes"].update(run=["modelopt_int8"]),
    ),
    # screening refines in float32: a pass that is not float32, or tf32 off CUDA, is refused upfront
    Case(
        "screening-bf16-pass",
        "sensitivity",
        "case.yaml: sensitivity.native.screening: bfloat16 screening refines in float32, so the pass must",
        params=lambda d: d["sensitivity"]["native"].update(dtype="bfloat16", screening="bfloat16"),
    ),
    Case(
        "screening-tf32-cpu",
        "sensitivity",
        "case.yaml: sensitivity.native.screening: tf32 is a CUDA matmul mode (device cpu)",
        params=lambda d: d["sensitivity"]["native"].update(device="cpu", screening="tf32"),
    ),
    # first_order: the native engine's estimate, of INC's cumulative curve, audited by fewer ops than scored
    Case(
        "first-order-engine-inc",
        "sensitivity",
        "case.yaml: sensitivity.native.screening: first_order is the native engine's estimate",
        params=lambda d: (
            d["sensitivity"].update(engine="inc"),
            d["sensitivity"]["native"].update(screening="first_order"),
        ),
    ),
    Case(
        "first-order-isolated",
        "sensitivity",
        "case.yaml: sensitivity.native.screening: first_order estimates INC's cumulative requant curve",
        params=lambda d: (
            d["sensitivity"].update(engine="native"),
            d["sensitivity"]["native"].update(screening="first_order", requant_mode="isolated"),
        ),
    ),
    Case(
        "first-order-audit-over-ops",
        "sensitivity",
        "case.yaml: sensitivity.native.audit: the first_order audit draws 40 ops per phase, more than the 17",
        params=lambda d: (
            d["sensitivity"].update(engine="native"),
            d["sensitivity"]["native"].update(screening="first_order", audit=40),
        ),
    ),
    Case(
        "exact-top-zero",
        "sensitivity",
        "sensitivity.native.exact_top: expected",
        params=lambda d: d["sensitivity"]["native"].update(exact_top=0),
    ),
    Case(
        "exact-budget-below-top",
        "sensitivity",
        "case.yaml: sensitivity.native.exact_budget: exact_budget 4 cannot measure the top exact_top=32",
        params=lambda d: d["sensitivity"]["native"].update(screening="bfloat16", exact_budget=4),
    ),
    Case(
        "exact-budget-unscreened",
        "sensitivity",
        "case.yaml: sensitivity.native.exact_budget: exact_budget caps a screened pass's float32 trials",
        params=lambda d: d["sensitivity"]["native"].update(exact_budget=40),
    ),
    Case(
        "screening-margin",
        "sensitivity",
        "sensitivity.native.screening_margin: expected a positive number",
        params=lambda d: d["sensitivity"]["native"].update(screening_margin=0),
    ),
    # more processes than usable cores (cpu) or GPUs (cuda): refused before the model loads, none started
    Case(
        "processes-over-cores",
        "sensitivity",
        "case.yaml: sensitivity.native.processes: 1000 processes on cpu, but this run may use",
        params=lambda d: d["sensitivity"]["native"].update(device="cpu", processes=1000),  # engine native
    ),
    # params the models reject (op_sensitivity.params): a misspelt key no longer leaves its default
    # in force, a value INC's static PyTorch pass cannot do is no longer ignored, and an empty
    # schemes.run no longer fails later in `dvc repro`; every stage stops, the first one included
    Case(
        "native-key-typo",
        "prepare_captions",
        "case.yaml: sensitivity.native.devcie: unknown key (expected one of device, dtype,",
        params=lambda d: d["sensitivity"]["native"].update(devcie="cuda"),
    ),
    Case(
        "op-dtype-int4",
        "sensitivity",
        "case.yaml: sensitivity.op_type_dict.Linear.weight.dtype[0]: expected one of fp32, bf16, int8, "
        "uint8 (the dtypes INC's static PyTorch pass takes op-wise), got 'int4'",
        params=_set("sensitivity", op_type_dict={"Linear": {"weight": {"dtype": ["int4"]}}}),
    ),
    Case(
        "op-type-unknown",
        "sensitivity",
        "case.yaml: sensitivity.op_type_dict.Foo: expected an op type INC's PyTorch adaptor quantizes "
        "(one of Conv1d, Conv2d, Conv3d,",
        params=_set("sensitivity", op_type_dict={"Foo": FP32}),
    ),
    Case(
        "schemes-run-empty",
        "prepare_captions",
        "case.yaml: schemes.run: expected at least one scheme, got []",
        params=_set("schemes", run=[]),
    ),
    # sweep: an op_name_dict / op_type_dict key INC would ignore (a typo gave a report identical to
    # no setting), for both engines and the scheme passes
    Case(
        "op-name-matches-no-op",
        "sensitivity",
        "case.yaml: sensitivity.op_name_dict.lm_hed: matches no op of the model (17 ops in "
        "reports/model/op_inventory.json; e.g. ",
        params=_op_name_dict("lm_hed"),
    ),
    Case(  # sweep: full-matched as INC does, so a prefix is no match
        "op-name-regex-prefix-only",
        "sensitivity",
        "case.yaml: sensitivity.op_name_dict.model\\.visual: matches no op of the model",
        params=_op_name_dict(r"model\.visual"),
    ),
    Case(  # sweep: a key asking for int8 is checked too
        "op-name-int8-matches-no-op",
        "sensitivity",
        "case.yaml: sensitivity.op_name_dict.model\\.language_model\\.layers\\.9\\..*: matches no op",
        params=_op_name_dict(r"model\.language_model\.layers\.9\..*", {"weight": {"dtype": ["int8"]}}),
    ),
    Case(  # sweep: INC's own engine
        "op-name-matches-no-op-inc",
        "sensitivity",
        "case.yaml: sensitivity.op_name_dict.lm_hed: matches no op of the model",
        params=_op_name_dict("lm_hed", engine="inc"),
    ),
    Case(  # sweep: a scheme pass reads the same block
        "op-name-matches-no-op-scheme",
        "sensitivity",
        "case.yaml: sensitivity.op_name_dict.lm_hed: matches no op of the model",
        params=_op_name_dict("lm_hed"),
        args=["--scheme", "modelopt_int8"],
    ),
    Case(  # sweep
        "op-type-matches-no-op",
        "sensitivity",
        "case.yaml: sensitivity.op_type_dict.Conv2d: matches no op type of the model (17 ops in "
        "reports/model/op_inventory.json, of types Conv3d, Embedding, Linear)",
        params=_set("sensitivity", op_type_dict={"Conv2d": FP32}),
    ),
    Case(
        "model-dir-without-card",
        "sensitivity",
        "op_sensitivity_model.json: missing (run the load_model stage",
        args=["--model", "bad"],
        names_params_file=False,
    ),
    Case(
        "inventory-truncated",
        "sensitivity",
        "not an op inventory",
        names_params_file=False,
        files=_truncated_copy("reports/model/op_inventory.json", "--inventory"),
    ),
    Case(
        "calibration-missing",
        "sensitivity",
        "bad/meta.json: missing (run the prepare_captions stage first)",
        args=["--calibration", "bad"],
        names_params_file=False,
    ),
    # sweep: the model directory's own weights and card, a calibration image, the inventory's ops
    Case(
        "model-safetensors-truncated",
        "sensitivity",
        "model/model.safetensors: not a readable safetensors file",
        files=_model_copy(_weights(_truncate_file())),
        names_params_file=False,
    ),
    Case(
        "model-card-garbage",
        "sensitivity",
        "op_sensitivity_model.json: not valid JSON",
        files=_model_copy(_card("garbage")),
        names_params_file=False,
    ),
    Case(
        "calibration-image-empty",
        "sensitivity",
        "image of record 0 does not decode",
        files=_split_copy("calibration", "--calibration", _truncate_file(0)),
        names_params_file=False,
    ),
    Case(
        "inventory-op-not-in-model",
        "sensitivity",
        "op_inventory.json: ops[0] 'model.nope' is not a module of the model",
        files=_json_copy("reports/model/op_inventory.json", "--inventory", _rename_first_op),
        names_params_file=False,
    ),
    # --- crosscheck (failing before its INC rerun) ---------------------------------------------
    Case(
        "crosscheck-report-truncated",
        "crosscheck",
        "not valid JSON",
        names_params_file=False,
        files=_truncated_copy("reports/sensitivity/op_sensitivity.json", "--sensitivity"),
    ),
    Case(  # sweep
        "crosscheck-op-name-matches-no-op",
        "crosscheck",
        "case.yaml: sensitivity.op_name_dict.lm_hed: matches no op of the model",
        params=_op_name_dict("lm_hed"),
    ),
    # sweep: the model's weights (crosscheck loads the model dir as the sensitivity stage does)
    Case(
        "crosscheck-model-safetensors-empty",
        "crosscheck",
        "model/model.safetensors: not a readable safetensors file",
        files=_model_copy(_weights(_truncate_file(0))),
        names_params_file=False,
    ),
    # --- rank_report ---------------------------------------------------------------------------
    Case(
        "crosscheck-json-truncated",
        "rank_report",
        "crosscheck.json: not valid JSON",
        names_params_file=False,
        files=_truncated_copy("reports/sensitivity/crosscheck.json", "--crosscheck"),
    ),
    Case(
        "crosscheck-json-foreign",
        "rank_report",
        "not a crosscheck result",
        names_params_file=False,
        files=_bad_file("crosscheck.json", "{}", "--crosscheck"),
    ),
    Case(
        "report-nan",
        "rank_report",
        "mse values must be finite numbers",
        names_params_file=False,
        files=_report_with(_not_nan),
    ),
    # sweep: the report's validator checks each level's type before reading the next
    Case(
        "report-phases-empty-list",
        "rank_report",
        "op_sensitivity.json: phases: expected an object with fallback and requant, got []",
        names_params_file=False,
        files=_report_with(lambda r: r.update(phases=[])),
    ),
    Case(
        "report-missing",
        "rank_report",
        "sensitivity report missing (run the sensitivity stage first)",
        args=["--sensitivity", "bad/none.json"],
        names_params_file=False,
    ),
    Case(
        "keep-list-foreign",
        "rank_report",
        "fallback_ops.json: not a keep-list of schema_version 2",
        names_params_file=False,
        files=_bad_file("fallback_ops.json", "{}", "--keep-list"),
    ),
    Case(
        "table-top-zero",
        "rank_report",
        "case.yaml: report.table_top: expected an integer >= 1 or null",
        params=_set("report", table_top=0),
    ),
    # --- fallback_list -------------------------------------------------------------------------
    Case(
        "always-keep-typo",
        "fallback_list",
        "case.yaml: fallback.always_keep[0]: 'lm_hed' matches no op",
        params=_set("fallback", always_keep=["lm_hed"]),
    ),
    Case(
        "never-keep-typo",
        "fallback_list",
        "case.yaml: fallback.never_keep[0]: 'nope*' matches no op",
        params=_set("fallback", never_keep=["nope*"]),
    ),
    Case(
        "threshold-selects-nothing",
        "fallback_list",
        "case.yaml: fallback.threshold.value: selects no op",
        params=_set("fallback", policy="threshold", threshold={"value": 10.0, "relative": False}),
    ),
    Case(
        "top-k-too-large",
        "fallback_list",
        "case.yaml: fallback.top_k.k: expected at most 17",
        params=_set("fallback", policy="top_k", top_k={"k": 99}),
    ),
    Case(
        "policy-unknown",
        "fallback_list",
        "fallback.policy: expected one of top_k, top_fraction",
        params=_set("fallback", policy="random"),
    ),
    Case(
        "onnx-missing",
        "fallback_list",
        "case.yaml: fallback.onnx_model: bad/none.onnx not found",
        params=_set("fallback", onnx_model="bad/none.onnx"),
    ),
    Case("onnx-two-graphs", "fallback_list", "holds 2 .onnx files", files=_onnx_dir(2)),
    Case(  # sweep: a valid graph of another network would give nodes_to_exclude [] (quantize all)
        "onnx-other-network",
        "fallback_list",
        "other.onnx: not an export of this model: none of its 2 nodes belongs to one of the model's",
        files=_onnx_graph("/features/features.0/MatMul", "/classifier/MatMul"),
    ),
    Case(  # sweep: a graph of part of the model, without the kept lm_head: ORT would quantize it
        "onnx-kept-modules-missing",
        "fallback_list",
        "kept modules have no node in the graph: ",
        files=_onnx_graph("/model/language_model/layers.0/mlp/down_proj/MatMul"),
    ),
    # --- check_params: the DAG's first stage, before DVC deletes any other stage's outputs ------
    Case(  # sweep: the pre-check only tested that the file exists; DVC then deleted reports/fallback
        "check-onnx-garbage",
        "check_params",
        "case.yaml: fallback.onnx_model: ",
        files=_onnx_dir(1, b"nope"),
    ),
    Case(
        "check-later-block",
        "check_params",
        "case.yaml: fallback.policy: expected one of top_k, top_fraction",
        params=_set("fallback", policy="best"),
    ),
    Case(  # sweep: `model.input: 5` made `dvc status` itself crash (dvc.yaml now appends "/")
        "check-model-input-not-a-path",
        "check_params",
        "case.yaml: model.input: expected a string",
        params=_set("model", input=5),
    ),
    Case(
        "check-annotations-missing",
        "check_params",
        "case.yaml: captions.annotations: bad/none.json is not a file",
        params=_set("captions", annotations="bad/none.json"),
    ),
    Case(
        "onnx-garbage",
        "fallback_list",
        "m0.onnx: not a loadable ONNX model",
        files=_onnx_dir(1, b"nope"),
        names_params_file=False,
    ),
    # --- the held-out splits, the curve and validate --------------------------------------------
    Case(  # 20 images: count 4 leaves 16
        "selection-count-too-large",
        "prepare_captions",
        "case.yaml: captions.selection_count: expected at most 16 (images with captions outside the "
        "calibration sample (captions.count)), got 99",
        params=_set("captions", selection_count=99),
    ),
    Case(  # count 4 + selection_count 6 leave 10
        "test-count-too-large",
        "prepare_captions",
        "case.yaml: captions.test_count: expected at most 10 (images with captions outside the calibration "
        "sample and the selection split (captions.count + selection_count)), got 11",
        params=_set("captions", test_count=11),
    ),
    Case(
        "test-count-zero",
        "prepare_captions",
        "captions.test_count: expected an integer >= 1, got 0",
        params=_set("captions", test_count=0),
    ),
    Case(
        "eval-count-legacy-key",
        "prepare_captions",
        "case.yaml: captions.eval_count: replaced by selection_count and test_count",
        params=lambda d: d["captions"].update(eval_count=6),
    ),
    Case(
        "curve-metric-unknown",
        "curve",
        "case.yaml: curve.metric: expected one of kl, top1, nll, logit_se",
        params=_set("curve", metric="bleu"),
    ),
    Case(
        "curve-max-points",
        "curve",
        "curve.max_points: expected auto, null (every size) or an integer >= 2, got 1",
        params=_set("curve", max_points=1),
    ),
    Case(
        "curve-splits-swapped",
        "curve",
        "data/calibration/meta.json: the selection split expected, got the calibration",
        args=["--selection", "data/calibration"],
        names_params_file=False,
    ),
    Case(  # the list was chosen on the selection split: validate refuses to prove it there
        "validate-on-the-selection-split",
        "validate",
        "data/selection/meta.json: the test split expected, got the selection split",
        args=["--test", "data/selection"],
        names_params_file=False,
    ),
    Case(
        "curve-report-of-another-model",
        "curve",
        "not the model the sensitivity report scored",
        files=_report_with(lambda r: r["metadata"]["model"].update(sha256="0" * 64)),
        names_params_file=False,
    ),
    # sweep: a held-out image, the model's weights and card, read by curve and validate
    Case(
        "selection-image-truncated",
        "curve",
        "image of record 0 does not decode",
        files=_split_copy("selection", "--selection", _truncate_file()),
        names_params_file=False,
    ),
    Case(
        "test-image-truncated",
        "validate",
        "image of record 0 does not decode",
        files=_split_copy("test", "--test", _truncate_file()),
        names_params_file=False,
    ),
    Case(
        "curve-model-safetensors-garbage",
        "curve",
        "model/model.safetensors: not a readable safetensors file",
        files=_model_copy(_weights(lambda f: f.write_bytes(b"garbage" * 999))),
        names_params_file=False,
    ),
    Case(
        "curve-model-card-unknown-key",
        "curve",
        "op_sensitivity_model.json: unknown key 'extra'",
        files=_model_copy(_card_with(extra=1)),
        names_params_file=False,
    ),
    Case(
        "validate-model-safetensors-truncated",
        "validate",
        "model/model.safetensors: not a readable safetensors file",
        files=_model_copy(_weights(_truncate_file())),
        names_params_file=False,
    ),
    Case(
        "validate-keep-list-unknown-module",
        "validate",
        "fallback_ops.json: ops[0].module 'model.nope' is not an op",
        files=_json_copy("reports/fallback/fallback_ops.json", "--keep-list", _keep_unknown),
        names_params_file=False,
    ),
    Case(
        "validate-report-without-excluded-ops",
        "validate",
        "op_sensitivity.json: metadata.excluded_ops: missing",
        files=_report_with(lambda r: r["metadata"].pop("excluded_ops")),
        names_params_file=False,
    ),
    Case(
        "validate-keep-list-missing",
        "validate",
        "keep-list missing (run the fallback_list stage first)",
        args=["--keep-list", "bad/none.json"],
        names_params_file=False,
    ),
    Case(
        "validate-curve-truncated",
        "validate",
        "curve.json: not valid JSON",
        names_params_file=False,
        files=_truncated_copy("reports/validation/curve.json", "--curve"),
    ),
    Case(
        "inc-check-not-bool",
        "validate",
        "case.yaml: validate.inc_check: expected true/false",
        params=_set("validate", inc_check="yes"),
    ),
    Case(
        "section-missing",
        "rank_report",
        "none.md: report section missing",
        names_params_file=False,
        args=["--validation", "bad/none.md"],
    ),
    Case(
        "measured-without-curve",
        "fallback_list",
        "none.json: ranking curve missing (run the curve stage first)",
        args=["--curve", "bad/none.json"],
        names_params_file=False,
    ),
    Case(
        "measured-ranking-unknown",
        "fallback_list",
        "fallback.measured_budget.ranking: expected one of fallback",
        params=_set("fallback", measured_budget={"metric": "kl", "percent": 10, "ranking": "best"}),
    ),
    Case(
        "bits-budget-two-budgets",
        "fallback_list",
        "case.yaml: fallback.bits_budget.bits: expected exactly one of bits or params_share",
        params=_set(
            "fallback", policy="bits_budget", bits_budget={"metric": "kl", "bits": 9.0, "params_share": 0.1}
        ),
    ),
    Case(
        "bits-budget-no-room",
        "fallback_list",
        "case.yaml: fallback.bits_budget: 8.01 effective weight bits leave no room",
        params=_set("fallback", policy="bits_budget", bits_budget={"metric": "kl", "bits": 8.01}),
    ),
]
if not torch.cuda.is_available():
    CASES.append(
        Case(
            "cuda-missing",
            "sensitivity",
            "case.yaml: sensitivity.native.device: cuda requested",
            params=lambda d: d["sensitivity"]["native"].update(device="cuda"),
        )
    )
    CASES.append(
        Case(  # sweep: INC reads no native settings, but curve / validate / crosscheck do: refused upfront
            "cuda-missing-inc-engine",
            "sensitivity",
            "case.yaml: sensitivity.native.device: cuda requested",
            params=lambda d: d["sensitivity"].update(
                engine="inc", native={**d["sensitivity"]["native"], "device": "cuda"}
            ),
        )
    )


def _one_error_line(code: int, err: str, expected: str) -> list[str]:
    """A bad-input exit: code 2, no traceback, exactly one ``error:`` line holding ``expected``."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and expected in lines[0], err
    return lines


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(workspace, case):
    ws, bad = workspace, workspace / "bad"
    bad.mkdir(exist_ok=True)
    data = good_params()
    if case.params:
        case.params(data)
    (ws / "case.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    before = snapshot(ws)
    extra = case.files(ws, bad) if case.files else []
    args = ["--params", "case.yaml", *extra, *case.args]
    try:
        code, err = run_script(STAGES / f"{case.stage}.py", args, ws)
    finally:
        shutil.rmtree(bad, ignore_errors=True)
    lines = _one_error_line(code, err, case.expected)
    if case.names_params_file:
        assert lines[0].startswith("error: case.yaml: "), lines[0]
    assert snapshot(ws) == before
    assert strays(ws) == []


def test_written_files_follow_the_umask(workspace, tmp_path):
    """An unusual umask (027) to tell "follows the umask" from "always 0644/0755" (and 0600/0700)."""
    old = os.umask(0o027)
    try:
        code, err = run_script(STAGES / "prepare_captions.py", ["--out", str(tmp_path / "cal")], workspace)
        assert code == 0, err
        code, err = run_script(
            STAGES / "fallback_list.py",
            ["--out-dir", str(tmp_path / "fallback"), "--metrics", str(tmp_path / "m.json")],
            workspace,
        )
        assert code == 0, err
    finally:
        os.umask(old)
    for out in ("cal", "fallback"):
        assert (tmp_path / out).stat().st_mode & 0o777 == 0o750
        assert {p.stat().st_mode & 0o777 for p in (tmp_path / out).rglob("*") if p.is_file()} == {0o640}
        assert {p.stat().st_mode & 0o777 for p in (tmp_path / out).rglob("*") if p.is_dir()} <= {0o750}
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o640


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_leftovers_of_killed_runs_are_removed_at_the_next_write(workspace):
    dead, alive = _dead_pid(), os.getpid()
    leftover_dir = workspace / f"models/.qwen2_5_vl{TMP_TAG}{dead}-abc"
    leftover_dir.mkdir()
    (leftover_dir / "model.safetensors").write_bytes(b"half")
    leftover_file = workspace / f"reports/model/.op_inventory.json{TMP_TAG}{dead}-x"
    leftover_file.write_text("{")
    running = workspace / f"models/.qwen2_5_vl{TMP_TAG}{alive}-mine"  # a live writer's: kept
    running.mkdir()
    try:
        code, err = run_script(STAGES / "load_model.py", [], workspace)
        assert code == 0, err
        assert not leftover_dir.exists() and not leftover_file.exists()
        assert running.is_dir()
    finally:
        running.rmdir()


SIGNAL_SCRIPT = """
import sys, time
from pathlib import Path
from op_sensitivity import logs
from op_sensitivity.atomic import atomic_dir
from op_sensitivity.cli import run_stage

def main():
    with atomic_dir(Path(sys.argv[1])) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 1000)
        print("ready", flush=True, file=logs.terminal_out())  # stdout is the stage's log file
        time.sleep(60)

run_stage(main)
"""


def _default_signals() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_killed_stage_unwinds_through_the_same_cleanup(tmp_path, signum):
    """A real process killed while its output is half-written: old output intact, no temporary left."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "good.txt").write_text("previous run")
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGNAL_SCRIPT, str(out)],
        cwd=tmp_path,  # its logs/ there, not in the checkout
        env=venv_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A background job (`make test &`, nohup, some CI runners) inherits SIGINT ignored, as
        # POSIX says, and Python then keeps ignoring it: give the child the disposition a
        # terminal's foreground process has, so Ctrl-C reaches it whoever launched the suite.
        preexec_fn=_default_signals,
    )
    assert proc.stdout.readline().strip() == "ready"
    assert len(list(tmp_path.glob(f".out{TMP_TAG}*"))) == 1  # the half-written temporary exists
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signum, err
    assert f"stopped by {signal.Signals(signum).name}" in err and "Traceback" not in err
    assert list(tmp_path.glob(f".out{TMP_TAG}*")) == []
    assert [p.name for p in out.iterdir()] == ["good.txt"]


SWALLOWING_SCRIPT = """
import os, signal, sys, time
from pathlib import Path
from op_sensitivity.atomic import atomic_dir
from op_sensitivity.cli import raise_if_terminated, run_stage

def main():
    with atomic_dir(Path(sys.argv[1])) as tmp:
        try:  # what INC's FX tracing fallback does with any exception, a kill's included
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except:  # noqa: E722
            pass
        raise_if_terminated()  # the engines call it between ops and after a pass
        (tmp / "written.txt").write_text("a pass that was killed")

run_stage(main)
"""


def test_a_kill_that_library_code_swallows_still_unwinds(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "good.txt").write_text("previous run")
    proc = subprocess.run(
        [sys.executable, "-c", SWALLOWING_SCRIPT, str(out)],
        env=venv_env(),
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_default_signals,
    )
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "stopped by SIGTERM" in proc.stderr and "Traceback" not in proc.stderr
    assert [p.name for p in out.iterdir()] == ["good.txt"] and list(tmp_path.glob(f".out{TMP_TAG}*")) == []


def _wait_for(path: Path, pid_not: int | None = None, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            doc = json.loads(path.read_text())
            if doc["run"]["pid"] != pid_not:
                return doc
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def test_killed_sensitivity_runs_leave_outputs_and_never_mix_partial_results(workspace):
    """SIGTERM then SIGKILL during real INC passes, then a fresh run: each partial file is one run's."""
    data = good_params()
    data["sensitivity"]["engine"] = "inc"
    (workspace / "case.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    partial = workspace / ".op_sensitivity_work/partial_capture.json"
    partial.unlink(missing_ok=True)
    before = snapshot(workspace)
    cmd = [sys.executable, str(STAGES / "sensitivity.py"), "--params", "case.yaml"]
    seen = []
    for signum in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen(cmd, cwd=workspace, env=venv_env(), stderr=subprocess.PIPE, text=True)
        doc = _wait_for(partial, pid_not=seen[-1]["run"]["pid"] if seen else None)
        assert doc["run"]["pid"] == proc.pid and doc["run"]["engine"] == "inc"
        assert doc["run"]["params"]["engine"] == "inc" and len(doc["run"]["model_sha256"]) == 64
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == (128 + signum if signum != signal.SIGKILL else -signum), err
        if signum == signal.SIGTERM:
            assert "stopped by SIGTERM" in err and "Traceback" not in err
        seen.append(json.loads(partial.read_text()))
        assert seen[-1]["run"]["pid"] == proc.pid  # what is left names the run that left it
        assert snapshot(workspace) == before and strays(workspace) == []
    code, err = run_script(STAGES / "sensitivity.py", [], workspace)  # the native run of params.yaml
    assert code == 0, err
    last = json.loads(partial.read_text())
    assert last["run"]["pid"] == os.getpid() and last["run"]["engine"] == "native"
    assert last["run"]["started"] > seen[-1]["run"]["started"]
    assert [(c["phase"], c["batch"]) for c in last["calls"]] == [("fallback", 0), ("requant", 0)]
    assert snapshot(workspace) == before  # same inputs, same bytes


def test_check_params_stops_before_dvc_touches_anything(workspace):
    data = good_params()
    data["captions"]["annotations"] = "data/missing.json"
    (workspace / "case.yaml").write_text(yaml.safe_dump(data))
    code, err = run_script(REPO / "scripts/check_params.py", ["case.yaml"], workspace)
    assert code == 2 and "error: case.yaml: captions.annotations: data/missing.json is not a file" in err
    code, err = run_script(REPO / "scripts/check_params.py", ["params.yaml"], workspace)
    assert code == 0, err


def _total_memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        pytest.param(
            {"sensitivity": {"native": {"device": "cuda"}}},
            "error: case.yaml: sensitivity.native.device: cuda requested but no CUDA device is available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present"),
            id="cuda-absent",
        ),
        pytest.param(
            {
                "model": {"source": "full_size_random", "full_size": "3b"},
                "sensitivity": {"max_ops": 500},
                "crosscheck": {"whole_max_params": 10**10, "scope": "auto"},
            },
            "error: case.yaml: crosscheck.whole_max_params: INC on the whole model (3,754,622,976 "
            "parameters) needs ~71 GiB",
            marks=pytest.mark.skipif(_total_memory_gib() > 71, reason="this machine holds INC on a 3B"),
            id="inc-on-a-whole-3b",
        ),
    ],
)
def test_a_plan_that_cannot_fit_stops_with_the_param_named(workspace, case, expected):
    """The plan (scripts/check_params.py, before `dvc repro`): one line naming the param, exit 2,
    and nothing of the previous run touched; the plan's table is printed before the verdict."""
    data = good_params()
    for block, values in case.items():
        for key, value in values.items():
            if isinstance(value, dict):
                data[block][key].update(value)
            else:
                data[block][key] = value
    (workspace / "case.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    before = snapshot(workspace)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code, err = run_script(REPO / "scripts/check_params.py", ["case.yaml", "--no-probe"], workspace)
    assert code == 2 and expected in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert snapshot(workspace) == before and strays(workspace) == []


def test_atomic_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError
    assert (out / "a").read_text() == "1" and strays(tmp_path) == []


# --- OS errors on output paths (sweep of b375a75: tracebacks) -----------------------------------


def _directory_at(rel: str, arg: str) -> Callable[[Path, Path], list[str]]:
    """``arg`` pointed at bad/<rel>, a directory where the stage writes a file."""

    def setup(ws: Path, bad: Path) -> list[str]:
        (bad / rel).mkdir(parents=True)
        return [arg, f"bad/{rel}"]

    return setup


def _file_at(rel: str, arg: str, under: str = "") -> Callable[[Path, Path], list[str]]:
    """``arg`` pointed at bad/<rel>[/<under>], where bad/<rel> is a file and a directory is needed."""

    def setup(ws: Path, bad: Path) -> list[str]:
        (bad / rel).parent.mkdir(parents=True, exist_ok=True)
        (bad / rel).write_text("a file\n")
        return [arg, f"bad/{rel}/{under}" if under else f"bad/{rel}"]

    return setup


OS_CASES = [
    Case(
        "params-check-a-directory",
        "check_params",
        "bad/params_check.json",
        files=_directory_at("params_check.json", "--out"),
        names_params_file=False,
    ),
    Case(
        "fallback-metrics-a-directory",
        "fallback_list",
        "bad/fallback_metrics.json",
        files=lambda ws, bad: [
            *_directory_at("fallback_metrics.json", "--metrics")(ws, bad),
            "--out-dir",
            "bad/fallback",
        ],
        names_params_file=False,
    ),
    Case(
        "workspace-a-file",
        "sensitivity",
        "bad/work",
        files=_file_at("work", "--workspace"),
        names_params_file=False,
    ),
    Case(
        "runtime-dir-a-file",
        "sensitivity",
        "bad/runtime",
        files=lambda ws, bad: [
            *_file_at("runtime", "--runtime", "sensitivity.json")(ws, bad),
            *("--out", "bad/op_sensitivity.json", "--metrics", "bad/metrics.json"),
        ],
        names_params_file=False,
    ),
    Case(
        "params-a-directory",
        "prepare_captions",
        "bad/p.yaml: is a directory, expected the params YAML file",
        files=lambda ws, bad: ((bad / "p.yaml").mkdir(), ["--params", "bad/p.yaml"])[1],
        names_params_file=False,
    ),
    Case(
        "params-a-key-twice",
        "load_model",
        "bad/p.yaml: line 3: key 'curve' written twice (first at line 1); YAML keeps only the last",
        files=_bad_file("p.yaml", "curve:\n  metric: kl\ncurve:\n  metric: top1\n", "--params"),
        names_params_file=False,
    ),
]


@pytest.mark.parametrize("case", OS_CASES, ids=[c.id for c in OS_CASES])
def test_an_os_error_on_a_path_is_one_line_naming_it(workspace, case):
    """As test_bad_input_is_one_clear_line_and_changes_nothing, and no main output the stage would
    write before the failing one (it is pointed into bad/) was written there: a stage that fails on
    one output path must not have replaced another first."""
    ws, bad = workspace, workspace / "bad"
    bad.mkdir(exist_ok=True)
    (ws / "case.yaml").write_text(yaml.safe_dump(good_params(), sort_keys=False))
    before = snapshot(ws)
    args = ["--params", "case.yaml", *case.files(ws, bad)]
    try:
        code, err = run_script(STAGES / f"{case.stage}.py", args, ws)
        written = sorted(str(p.relative_to(bad)) for p in bad.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(bad, ignore_errors=True)
    _one_error_line(code, err, case.expected)
    assert written in ([], ["runtime"], ["work"], ["p.yaml"]), written
    assert snapshot(ws) == before
    assert strays(ws) == []
