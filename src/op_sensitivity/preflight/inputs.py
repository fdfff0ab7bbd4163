"""The inputs a run needs, checked before anything runs: params.yaml and the files it names.

Why a stage of its own (``check_params``, the DAG's first): ``dvc repro`` deletes a stage's
previous outputs before it starts the stage's command, so a bad param found by the stage itself
costs the last good outputs. Every stage is downstream of ``check_params``, so DVC runs it first
whenever params.yaml or these paths change, and a bad value stops the run before DVC deletes
anything (``make repro`` calls the same check before the plan).
"""

from __future__ import annotations

from ..errors import require
from ..fallback.exports import load_onnx, onnx_graph
from ..model.source import check_hf_dir
from ..params import Params


def check_inputs(p: Params) -> None:
    """Raise :class:`InputError` naming the param on the first input that cannot work."""
    c = p.captions
    require(c.annotations.is_file(), c.where("annotations"), f"{c.annotations} is not a file")
    require(c.images_dir.is_dir(), c.where("images_dir"), f"{c.images_dir} is not a directory")
    if p.model.source == "hf_dir":
        check_hf_dir(p.model.input, p.model.where("input"))
    where = p.fallback.where("onnx_model")
    graph = onnx_graph(p.fallback.onnx_model, where)
    if graph is not None:
        load_onnx(graph, where)
