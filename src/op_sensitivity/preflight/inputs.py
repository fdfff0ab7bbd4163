"""The inputs a run needs, checked before anything runs: params.yaml and the files it names.

Why a stage of its own (``check_params``, the DAG's first): ``dvc repro`` deletes a stage's
previous outputs before it starts the stage's command, so a bad param found by the stage itself
costs the last good outputs. Every stage is downstream of ``check_params``, so DVC runs it first
whenever params.yaml or these paths change, and a bad value stops the run before DVC deletes
anything (``make repro`` calls the same check before the plan).

The rule: every check a stage makes on its params before its work is made here too, by calling
the stage's own function (never a copy of its rule), data-dependent ones included: the splits
``prepare_captions`` draws (so a count larger than the images is named here), the sample the
random model sources read, the numerics ``sensitivity.native`` asks of this machine (each pass:
the main one and every ``schemes.run``), the op-wise keys and the op count of each pass, and
the keep-list params that name ops or count their parameters. The ops come from the model's
module tree built without weights (``model.meta``): the same names and shapes ``load_model``
writes to the inventory. What no check can see without a forward: the fused groups (q/k/v,
gate/up) ``bits_budget`` widens the forced ops with, so its room is checked on the forced ops
alone (a lower bound: what is refused here is refused by the stage).

What a bare ``dvc repro`` does before this stage can speak: DVC hashes the stage's deps before
its command runs, so a file name in ``captions.images_dir`` that is not UTF-8 stops DVC itself
("'utf-8' codec can't encode character"), having removed only ``reports/params_check.json``
(this stage's constant output, git-tracked). ``make repro`` runs ``scripts/check_params.py``
before DVC, and :func:`check_file_names` names the file there.
"""

from __future__ import annotations

import os
from dataclasses import replace
from fnmatch import fnmatchcase
from pathlib import Path

from ..data.calibration import CALIBRATION_OUT, check_sample_input, draw_splits, load_calibration
from ..engines.contract import check_op_dicts, check_scored, exclusions
from ..engines.numerics import check_native_processes, resolve_numerics
from ..engines.runner import scheme_params
from ..errors import InputError, require
from ..fallback.exports import load_onnx, onnx_graph
from ..fallback.policy import bits_room, check_globs
from ..inventory import OpInfo, op_inventory
from ..model.meta import meta_model, model_config
from ..model.source import check_hf_dir
from ..model.tiny import tiny_config
from ..model.tokenizer import train_tokenizer
from ..params import Params, SensitivityParams

# How a message names the ops it checked against (the stages name reports/model/op_inventory.json)
MODEL_OPS = "the model of params.yaml's model block, built without weights"


# Directories the stages write that are no DVC output (so DVC never clears them): a file there
# would fail a stage after it wrote its main output (the runtime files) or before its pass.
SCRATCH_DIRS = (Path("reports/runtime"), Path(".op_sensitivity_work"))


def check_inputs(p: Params) -> None:
    """Raise :class:`InputError` naming the param on the first input that cannot work."""
    for d in SCRATCH_DIRS:
        require(d.is_dir() or not d.exists(), d, "a file where the stages write a directory; remove it")
    c = p.captions
    require(c.annotations.is_file(), c.where("annotations"), f"{c.annotations} is not a file")
    require(c.images_dir.is_dir(), c.where("images_dir"), f"{c.images_dir} is not a directory")
    check_file_names(c.images_dir, c.where("images_dir"))
    splits = draw_splits(c)  # prepare_captions' own draw: every count against the images it leaves
    if p.model.source == "hf_dir":
        check_hf_dir(p.model.input, p.model.where("input"))
    else:
        check_sample_input(p.model.input, p.model.where("input"), p.model.source, written_by_dag=True)
    where = p.fallback.where("onnx_model")
    graph = onnx_graph(p.fallback.onnx_model, where)
    if graph is not None:
        load_onnx(graph, where)
    passes = [p.sensitivity, *(scheme_params(p.sensitivity, s, p.schemes) for s in p.schemes.run)]
    for sens in passes:
        check_numerics(sens)
    ops = model_ops(p, [ann["caption"].strip() for _, ann in splits["calibration"]])
    check_op_dicts(p.sensitivity, ops, MODEL_OPS)
    excluded: set[str] = set()
    for i, sens in enumerate(passes):
        sens, kept_fp32, _ = exclusions(sens, ops, c.mode)
        check_scored(sens, len(ops) - len(kept_fp32))
        if i == 0:  # the main pass: the one the keep-list is chosen on
            excluded = {e.op_name for e in kept_fp32}
    check_keep_list_params(p, ops, excluded)


def check_numerics(sens: SensitivityParams) -> None:
    """What a pass asks of this machine (device, arithmetic, TF32, screening, processes), by the
    functions the sensitivity stage and the engines call."""
    resolve_numerics(sens)
    if sens.native.processes > 1:
        check_native_processes(sens)


def check_file_names(images_dir: Path, where: str) -> None:
    """Every name in the images directory is UTF-8: DVC hashes the directory (a dep of
    ``check_params`` and ``prepare_captions``) and fails on another name with a message naming
    neither the file nor the param."""
    try:
        with os.scandir(os.fsencode(images_dir)) as entries:
            for entry in entries:
                try:
                    entry.name.decode("utf-8")
                except UnicodeDecodeError as e:
                    shown = entry.name.decode("utf-8", "backslashreplace")
                    raise InputError(
                        f"{where}: {images_dir / shown}: the file name is not UTF-8 (byte {e.start}), "
                        "which DVC cannot hash; rename or remove it"
                    ) from e
    except OSError as e:
        raise InputError(f"{where}: {images_dir}: cannot list the directory ({e.strerror or e})") from e


def model_ops(p: Params, calibration_captions: list[str]) -> list[OpInfo]:
    """The op inventory ``load_model`` will write (names, types, shapes, parameters), without
    weights. The tiny source's vocabulary is its tokenizer's, trained as ``load_model`` trains it
    on the calibration captions (``calibration_captions``: the ones ``prepare_captions`` will
    write, used when ``model.input`` is its output; another sample is read)."""
    m = p.model
    if m.source == "tiny":
        captions = calibration_captions
        if m.input.resolve() != CALIBRATION_OUT.resolve():
            captions = [r.caption for r in load_calibration(m.input)[1]]
        config = tiny_config(m.tiny, train_tokenizer(captions, m.tiny.vocab_size))
    else:
        config, _ = model_config(m)
    # load_model's model holds one stored dtype, the config's (bf16 for a published snapshot and
    # full_size_random, float32 for tiny); transformers builds a meta model's vision tower in
    # float32 whatever the config says, so the inventory's weight_dtype (what bits_budget's room
    # counts a kept op at) is set from the config, as load_model's inventory will have it
    stored = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    return [replace(op, weight_dtype=stored) for op in op_inventory(meta_model(config))]


def check_keep_list_params(p: Params, ops: list[OpInfo], excluded: set[str]) -> None:
    """fallback_list's checks of the params that name ops or count their parameters: a glob that
    matches no op (``check_globs``), and ``bits_budget``'s room once the ops the sensitivity
    params keep fp32 and the forced ones (``always_keep`` among the scored ops, less
    ``never_keep``) are kept (``bits_room``)."""
    f = p.fallback
    check_globs(f, [op.name for op in ops])
    if f.policy != "bits_budget":
        return
    scored = [op.name for op in ops if op.name not in excluded]
    forced = {
        m
        for m in scored
        if any(fnmatchcase(m, g) for g in f.always_keep) and not any(fnmatchcase(m, g) for g in f.never_keep)
    }
    bits_room(f, excluded, forced, ops)
