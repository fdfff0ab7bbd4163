"""What tests import: repo paths, small sizes, subprocess helpers, the INC oracle, engine runs."""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from op_sensitivity.engines import cpu_kind
from op_sensitivity.engines.artifact import build_report
from op_sensitivity.engines.contract import FP32
from op_sensitivity.engines.runner import load_inputs, run_engine
from op_sensitivity.params import SensitivityParams

REPO = Path(__file__).resolve().parents[1]
SAMPLE_ANNOTATIONS = REPO / "data/coco-sample/annotations/captions_sample2017.json"
SAMPLE_IMAGES = REPO / "data/coco-sample/sample2017"
# Smallest sizes that keep every op kind: 1 vision block (window = full attention), 1 decoder layer.
SMALL_TINY = {
    "text": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    },
    "vision": {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2},
}
# A vision block's MLP by regex, and lm_head by name: its tied partner embed_tokens stays scored, so
# the engines must keep lm_head's weight fp32 while the embedding table is int8.
EXCLUDE = {r"model\.visual\.blocks\.0\.mlp\..*": FP32, "lm_head": FP32}
EXCLUDED = {*(f"model.visual.blocks.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")), "lm_head"}


# ONNX Runtime's MLAS picks its int8 kernels from CPUID, out of reach of the AVX2 emulation
# (engines.cpu_kind): without VNNI they saturate u8 x s8 pairs in int16 and the ort_qdq prediction
# does not model that; the deployed report says so (OrtQdq.gap_here), these tests do not run there.
ORT_NEEDS_VNNI = pytest.mark.skipif(
    "avx512_vnni" not in cpu_kind.cpu_flags(),
    reason="ONNX Runtime's U8S8 kernels saturate in int16 on a CPU without AVX512-VNNI; the prediction "
    "does not model it",
)


def sensitivity_params(**kw: Any) -> SensitivityParams:
    base = SensitivityParams(confidence_batches=1, batch_size=1, max_ops=64, tolerable_loss=0.99)
    return replace(base, **kw)


def engine_reports(
    model_dir: Path,
    calibration_dir: Path,
    params: SensitivityParams,
    engines: list[str],
    workspace: Path,
    mutate: Callable | None = None,
) -> dict[str, dict]:
    """Run each engine ("inc", "native", "native-fake_quant") on identical inputs, a fresh model each."""
    out = {}
    for spec_name in engines:
        engine, _, arithmetic = spec_name.partition("-")
        p = replace(params, native=replace(params.native, arithmetic=arithmetic or "auto"))
        model, spec, inventory, meta = load_inputs(
            p, calibration_dir, model_dir, model_dir.parent / "op_inventory.json"
        )
        if mutate:
            mutate(model)
        result = run_engine(engine, model, spec, workspace / spec_name)
        out[spec_name] = build_report(result, inventory, meta)
    return out


class IncOracle:
    """Reads INC's own local ``(op, type) -> mse`` dicts when its helpers return (``sys.settrace``).

    Independent of the capture: it never touches INC's module, it observes the unmodified
    functions' frames. A global trace function only sees Python calls and hands back a local
    tracer for the two helpers alone, so the rest of INC runs nearly untraced.
    """

    def __init__(self, util: Any):
        self.codes = {
            util.get_mse_order_per_fp32.__code__: "fallback",
            util.get_mse_order_per_int8.__code__: "requant",
        }
        self.seen: list[tuple[str, dict, dict | None, list]] = []

    def __call__(self, frame, event, arg):
        if frame.f_code in self.codes:
            frame.f_trace_lines = False
            return self._local
        return None

    def _local(self, frame, event, arg):
        if event == "return":
            loc = frame.f_locals
            main = {k: float(v) for k, v in loc["fallback_order"].items()}
            dc = loc.get("new_fallback_order")
            self.seen.append(
                (self.codes[frame.f_code], main, dc and {k: float(v) for k, v in dc.items()}, list(arg))
            )
        return self._local


def venv_env() -> dict[str, str]:
    """Environment for subprocesses: this interpreter's bin first, so `python` and `dvc` are ours."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("GIT_AUTHOR_NAME", "test")
    env.setdefault("GIT_AUTHOR_EMAIL", "test@example.com")
    env.setdefault("GIT_COMMITTER_NAME", "test")
    env.setdefault("GIT_COMMITTER_EMAIL", "test@example.com")
    return env


def run(
    cmd: list[str], cwd: Path, check: bool = True, env: dict[str, str] | None = None, keep_cr: bool = False
) -> subprocess.CompletedProcess:
    """``keep_cr``: the output as a terminal gets it, carriage returns kept (text mode turns each
    into a newline, so a progress bar's redraws would read as lines of their own)."""
    proc = subprocess.run(
        cmd, cwd=cwd, env={**venv_env(), **(env or {})}, capture_output=True, text=not keep_cr
    )
    if keep_cr:
        proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def sensitivity_stage(
    params: Path, calibration: Path, model: Path, out: Path, workspace: Path, python: str = sys.executable
) -> list[str]:
    """The sensitivity stage's command line, writing its three outputs into ``out``."""
    return [
        python,
        str(REPO / "stages/sensitivity.py"),
        "--params",
        str(params),
        "--calibration",
        str(calibration),
        "--model",
        str(model),
        "--inventory",
        str(model.parent / "op_inventory.json"),
        "--out",
        str(out / "op_sensitivity.json"),
        "--metrics",
        str(out / "metrics.json"),
        "--runtime",
        str(out / "runtime.json"),
        "--workspace",
        str(workspace),
    ]


def copy_repo(dest: Path) -> Path:
    """A fresh git repo holding this checkout's files as a commit of the work tree would (tracked and
    untracked-not-ignored): what a clone would have."""
    files = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], REPO).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "copy"], dest)
    return dest


# The files of a published Qwen2.5-VL snapshot beside its weights (Qwen2.5-VL-3B-Instruct's listing)
SNAPSHOT_FILES = (
    *("config.json", "generation_config.json", "model.safetensors.index.json", "preprocessor_config.json"),
    *("chat_template.json", "tokenizer.json", "tokenizer_config.json"),
)


def make_snapshot(model_dir: Path, out: Path, shard: str = "20KB") -> Path:
    """A local snapshot laid out as the published Qwen2.5-VL checkpoints are, from ``load_model``'s
    output ``model_dir``: bf16 weights in ``model-0000i-of-0000n.safetensors`` shards with their
    index, config and generation config, tokenizer, image processor and chat template; no card
    (a user's snapshot has none)."""
    import torch

    from op_sensitivity.model.source import CARD, load_model_dir

    model, _, _ = load_model_dir(model_dir)
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size=shard)
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and f.name != CARD and not (out / f.name).exists() and "safetensors" not in f.name:
            shutil.copy2(f, out / f.name)
    missing = [name for name in SNAPSHOT_FILES if not (out / name).is_file()]
    assert not missing and len(list(out.glob("model-*-of-*.safetensors"))) > 1, (
        missing,
        sorted(out.iterdir()),
    )
    return out


def run_script(script: Path, args: list[str], cwd: Path) -> tuple[int, str]:
    """Run a stage script as ``__main__`` in this process; its exit code and what it wrote to stderr."""
    old_argv, old_cwd, err = sys.argv, Path.cwd(), io.StringIO()
    sys.argv = [str(script), *args]
    os.chdir(cwd)
    code = 0
    try:
        with contextlib.redirect_stderr(err):
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    return code, err.getvalue()


def profiled_params_files(tmp_path: Path) -> list[tuple[str, Path]]:
    """params.yaml, and each profile applied to a copy of it (the way scripts/apply_profile.py does)."""
    from op_sensitivity.plan.profile import apply, read_profile

    files = [("params.yaml", REPO / "params.yaml")]
    for profile in sorted((REPO / "profiles").glob("*.yaml")):
        path = tmp_path / f"{profile.stem}.yaml"
        shutil.copy(REPO / "params.yaml", path)
        apply(path, read_profile(profile))  # validates the merged file with the models
        files.append((profile.name, path))
    return files
