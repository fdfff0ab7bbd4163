"""The one module that knows Intel Neural Compressor's internals (neural-compressor 3.7.1, 2.x API).

What it does: a forced, bounded ``mse_v2`` sensitivity pass. ``quantization.fit`` would only
call the per-op sensitivity helpers when a config misses the accuracy goal, and then only
as far as its tuning loop needs; we prepare ``MSE_V2TuneStrategy`` ourselves, build its
initial tuning config and call the adaptor's ``calculate_op_sensitivity`` exactly twice:

* ``fallback=True`` (INC's ``get_mse_order_per_fp32``): for each op, all other ops int8 and this
  op fp32; value = sum of squared differences at the output of the last op in the config
  (lm_head: the logits). LOW value = the op is MORE sensitive. When min >= 0.8 * max INC adds
  a "double check" pass over <= 5 ops with the worst op also fp32; we keep it apart.
* ``fallback=False`` (``get_mse_order_per_int8``) from an all-fp32 config: INC quantizes the ops
  one after another in config order and never reverts, so the values are a cumulative curve.
  (``requantize_cfgs`` is accepted but unused by INC 3.7.1: the int8 qconfigs come from the
  module-global ``op_cfg_mapping`` that the fallback phase fills, so fallback runs first.)

How values are read: the helpers keep ``(op_name, op_type) -> mse`` in a local dict and return
only the keys, sorted with ``key=`` reading that dict; ``sorted`` is looked up in the module's
globals. :func:`capture_mse` wraps both helpers and, only while one runs, shadows that
``sorted`` with one that records ``key(k)`` for every key and then sorts exactly as the builtin.
INC's return value is passed through unchanged; originals are restored on exit, exceptions
included. INC aggregates confidence batches by summing rank points (and in the requant phase
returns only the last batch's order), so we record every call's raw map and aggregate ourselves
(mean of the raw values, see ``sensitivity_report``).

Housekeeping done per op (from the wrapped ``tqdm`` iterator INC drives its loop with):
torch's unbounded ``functools.cache`` on ``assert_and_get_unique_device`` pins every per-op
deep copy; we clear it and collect; a SIGTERM / SIGHUP whose exception INC's bare ``except:``
swallowed is raised again (``cli.raise_if_terminated``). INC leaves a forward hook on the
caller's fp32 model per call; we remove the hooks a call added.

Besides the pass, INC's own static PTQ of a keep-list (:func:`ptq_model`, :func:`ptq_logits`:
validate's check) and its save / load round trip (:func:`save_q_model`, :func:`load_q_model`,
:func:`saved_config`: the ``inc`` quantize target), so that no other module calls INC.

The pass is described by ``engines.contract.PassSpec`` (ops, exclusions, batches), as for the
native engine; INC's own initial config must keep exactly the spec's exclusions fp32 (plus ops
its capability cannot quantize), or the pass stops.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import gc
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm as std_tqdm

from .. import logs
from ..cli import raise_if_terminated
from ..errors import CaptureError, InputError
from ..inventory import module_name
from ..model.compat import pixels_keep_their_dtype
from ..phases import FALLBACK, PHASES, REQUANT
from . import cpu_kind
from .contract import Capture, ExcludedOp, HelperCall, OpKey, PassResult, PassSpec

log = logging.getLogger(__name__)

REQUIRED_INC = "3.7.1"
CAPABILITY_REASON = "INC capability offers no int8 config for this op"
PATCH_EMBED_NOTE = (
    "Conv3d quantized: Qwen2_5_VisionPatchEmbed.forward is patched during the pass so it no "
    "longer reads proj.weight.dtype (a method on a quantized Conv3d); fp32 numerics unchanged"
)


class CalibrationLoader:
    """The model-input batches as INC's PyTorch adaptor reads a dataloader.

    INC iterates ``for example_inp, label in dataloader``: a bare dict batch with two keys would
    unpack into its keys, so each item is ``(inputs, None)``. INC also reads ``batch_size``.
    """

    def __init__(self, batches: list[dict[str, torch.Tensor]], batch_size: int):
        self.batches = batches
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], None]]:
        for batch in self.batches:
            yield batch, None

    def __len__(self) -> int:
        return len(self.batches)


def inc_util():
    """INC's adaptor helpers module, or a clear error when this INC lacks the 2.x API."""
    try:
        import neural_compressor

        _as_this_cpu_kind()
        from neural_compressor.adaptor.torch_utils import util
        from neural_compressor.strategy.mse_v2 import MSE_V2TuneStrategy  # noqa: F401

        logs.adopt("neural_compressor")  # its [INFO] lines into the stage's log file, not the terminal
    except ImportError as e:
        raise InputError(
            f"neural-compressor: the 2.x API (mse_v2 strategy, adaptor.torch_utils.util) is needed; "
            f"install neural-compressor=={REQUIRED_INC} ({e})"
        ) from e
    for name in ("get_mse_order_per_fp32", "get_mse_order_per_int8", "get_fallback_order", "op_cfg_mapping"):
        if not hasattr(util, name):
            raise InputError(
                f"neural-compressor {neural_compressor.__version__}: "
                f"adaptor.torch_utils.util.{name} not found; expected neural-compressor=={REQUIRED_INC}"
            )
    return util


def _as_this_cpu_kind() -> None:
    """Under the AVX2 emulation (``engines.cpu_kind``), INC computes as on an AVX2-only CPU: it reads
    VNNI from CPUID once (``CpuInfo``, a singleton) and fixes ``REDUCE_RANGE`` from it when its
    PyTorch adaptor is imported; ``torch_utils.util`` asks ``CpuInfo().vnni`` at each call. Both
    answer "no VNNI" after this, whichever of them was imported first."""
    if cpu_kind.emulated_cpu() != "avx2":
        return
    from neural_compressor.utils.utility import CpuInfo

    CpuInfo()._vnni = False
    import neural_compressor.adaptor.pytorch as adaptor

    adaptor.REDUCE_RANGE = True


def inc_op_names(op_name_dict: dict[str, Any]) -> dict[str, Any]:
    """User keys as INC must see them: INC full-matches each key against its op names, which carry
    a ``.module`` suffix where its tracing wrapped a module; the contract's rule
    (``engines.contract.exclusion_reason``) matches a key against both names, and so does this."""
    return {f"(?:{key})(?:\\.module)?": copy.deepcopy(cfg) for key, cfg in op_name_dict.items()}


def _hook_ids(model: nn.Module) -> dict[nn.Module, set[int]]:
    return {m: set(m._forward_hooks) for m in model.modules()}


def _remove_new_hooks(model: nn.Module, before: dict[nn.Module, set[int]]) -> None:
    for m in model.modules():
        for hook_id in set(m._forward_hooks) - before.get(m, set()):
            del m._forward_hooks[hook_id]


def release_quantization_caches() -> None:
    """Drop torch's per-module device cache (it keeps every per-op model copy alive) and collect."""
    from torch.ao.quantization.fx import utils as fx_utils

    cache_clear = getattr(fx_utils.assert_and_get_unique_device, "cache_clear", None)
    if cache_clear is not None:
        cache_clear()
    gc.collect()


@contextlib.contextmanager
def heap_frozen() -> Iterator[None]:
    """Collections inside see only what was allocated inside: the per-op model copies INC makes.

    :func:`release_quantization_caches` collects after every op; a full collection scans the
    whole heap (torch, transformers, sympy, the model). ``gc.freeze`` moves what exists now out of
    the collector's sight, so each collection walks only the young objects, and every per-op copy
    is still freed op by op. What was alive before stays alive during the pass anyway (the model,
    INC's strategy); the garbage left before is collected first, and whatever of the old heap dies
    inside is freed on exit. ``benchmarks/inc_gc_freeze.py`` (2-core EPYC), the same values both
    ways: the default's crosscheck pass 15.9 s frozen against 25.8 s, the same peak; the 3B's
    carved copy 265 s against 254 s (forwards dominate), peak 3.64 GiB against 4.18 GiB.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.collect()


def _op_loop(desc: str) -> Callable[[Iterable], Iterator]:
    """Stand-in for INC's ``tqdm``: a labelled progress bar that frees each op's copy before the next."""

    def loop(items: Iterable) -> Iterator:
        for item in std_tqdm(items, desc=desc, leave=False, file=logs.terminal_err()):
            yield item
            release_quantization_caches()
            raise_if_terminated()  # a kill INC's own bare excepts swallowed during this op

    return loop


@contextlib.contextmanager
def capture_mse(on_call: Callable[[Capture], None] | None = None) -> Iterator[Capture]:
    """Record every per-op MSE map INC's sensitivity helpers compute; restore INC on exit.

    ``on_call`` runs after each helper call (one phase x one confidence batch), e.g. to persist
    partial results of a long pass.
    """
    util = inc_util()
    capture = Capture()
    originals = {FALLBACK: util.get_mse_order_per_fp32, REQUANT: util.get_mse_order_per_int8}
    original_tqdm = util.tqdm

    def wrap(phase: str, original: Callable) -> Callable:
        def wrapper(adaptor, model, example_inp, tune_cfg):
            call = HelperCall(phase, batch=len(capture.phase(phase)))
            maps: list[list[tuple[OpKey, float]]] = []

            def recording_sorted(iterable, key=None, reverse=False):
                items = list(iterable)
                if key is not None:
                    maps.append([(k, float(key(k))) for k in items])
                return builtins.sorted(items, key=key, reverse=reverse)

            hooks = _hook_ids(model)
            util.sorted = recording_sorted
            util.tqdm = _op_loop(f"{phase} batch {call.batch}")
            start = time.perf_counter()
            try:
                result = original(adaptor, model, example_inp, tune_cfg)
            finally:
                del util.sorted
                util.tqdm = original_tqdm
                _remove_new_hooks(model, hooks)
                release_quantization_caches()
            call.seconds = time.perf_counter() - start
            call.returned = list(result)
            if maps:
                call.main = maps[0]
                call.double_check = maps[1] if len(maps) > 1 else None
            capture.calls.append(call)
            if on_call is not None:
                on_call(capture)
            log.info("%s batch %d: %d ops scored in %.1fs", phase, call.batch, len(call.main), call.seconds)
            return result

        return wrapper

    util.get_mse_order_per_fp32 = wrap(FALLBACK, originals[FALLBACK])
    util.get_mse_order_per_int8 = wrap(REQUANT, originals[REQUANT])
    try:
        yield capture
    finally:
        util.get_mse_order_per_fp32 = originals[FALLBACK]
        util.get_mse_order_per_int8 = originals[REQUANT]
        util.tqdm = original_tqdm
        if "sorted" in vars(util):
            del util.sorted


@contextlib.contextmanager
def patch_embed_compat() -> Iterator[str]:
    """Let INC quantize Qwen2.5-VL's patch-embedding Conv3d (scoped to the pass): ``model.compat``."""
    with pixels_keep_their_dtype():
        yield PATCH_EMBED_NOTE


def quantization_scheme(tune_cfg: dict) -> dict[str, Any]:
    """The int8 scheme INC applies, per op type, as read from its own config (what a reader must know).

    ``reduce_range`` is decided by INC from the CPU (no VNNI -> 7-bit activations), so the same
    model can score differently on another machine; the report records it.
    """
    from neural_compressor.adaptor.pytorch import REDUCE_RANGE

    by_type: dict[str, Any] = {}
    for (_, op_type), cfg in tune_cfg["op"].items():
        if op_type not in by_type and not _is_fp32(cfg):
            by_type[op_type] = {
                part: {k: v for k, v in cfg[part].items() if k != "quant_mode"}
                for part in ("weight", "activation")
                if part in cfg
            }
    return {"approach": tune_cfg["approach"], "reduce_range": bool(REDUCE_RANGE), "by_op_type": by_type}


def initial_tune_cfg(strategy, calib_samples: int) -> dict:
    """INC's initial (all-int8 where allowed) tuning config in the adaptor's dict form."""
    _, _, initial = strategy.initial_tuning_cfg()
    # _tune_cfg_converter reads it; fit() sets it from the tuning space.
    initial["calib_sampling_size"] = calib_samples
    return strategy._tune_cfg_converter(initial)


def _is_fp32(cfg: dict) -> bool:
    return (cfg.get("weight") or cfg["activation"])["dtype"] == "fp32"


def kept_fp32(tune_cfg: dict) -> list[OpKey]:
    """Ops the config keeps in fp32 (weight dtype, or activation dtype for weight-less ops)."""
    return [k for k, cfg in tune_cfg["op"].items() if _is_fp32(cfg)]


def _module_order(ops: dict[OpKey, Any], module_order: list[str]) -> list[OpKey]:
    """Config order INC will use: model module order, so the measuring hook sits on the last module.

    INC appends ops forced to fp32 by op_type_dict/op_name_dict at the end of its config; left
    there, the "last op" (where the error is measured) would be e.g. the patch embedding.
    """
    index = {name: i for i, name in enumerate(module_order)}
    unknown = [k for k in ops if module_name(k[0]) not in index]
    if unknown:
        raise CaptureError(f"INC reports ops that are not modules of the model: {unknown[:5]}")
    return sorted(ops, key=lambda k: index[module_name(k[0])])


def check_capture(capture: Capture, confidence_batches: int) -> None:
    """Refuse a pass whose capture is empty or short: never report part of a pass as the whole."""
    for phase in PHASES:
        calls = capture.phase(phase)
        if len(calls) != confidence_batches or not all(c.main for c in calls):
            raise CaptureError(
                f"INC {phase} phase: captured {sum(bool(c.main) for c in calls)} helper calls with values, "
                f"expected {confidence_batches}; the INC helpers or their use of sorted() changed "
                f"(expected neural-compressor=={REQUIRED_INC})"
            )


def build_strategy(
    model: nn.Module,
    loader,
    confidence_batches: int,
    tolerable_loss: float,
    op_type_dict: dict,
    op_name_dict: dict,
    workspace: Path,
):
    """Prepare MSE_V2TuneStrategy as ``quantization.fit`` would, without starting its tuning loop."""
    inc_util()
    from neural_compressor import PostTrainingQuantConfig
    from neural_compressor.config import AccuracyCriterion, TuningCriterion, _Config, options
    from neural_compressor.model import Model
    from neural_compressor.strategy.mse_v2 import MSE_V2TuneStrategy

    options.workspace = str(workspace)
    conf = PostTrainingQuantConfig(
        approach="static",
        tuning_criterion=TuningCriterion(
            strategy="mse_v2", strategy_kwargs={"confidence_batches": confidence_batches}, max_trials=1
        ),
        accuracy_criterion=AccuracyCriterion(criterion="relative", tolerable_loss=tolerable_loss),
        op_type_dict=copy.deepcopy(op_type_dict) or None,
        op_name_dict=inc_op_names(op_name_dict) or None,
        calibration_sampling_size=[len(loader) * loader.batch_size],
    )
    config = _Config(quantization=conf, benchmark=None, pruning=None, distillation=None, nas=None)
    strategy = MSE_V2TuneStrategy(
        model=Model(model, conf=conf), conf=config, q_dataloader=loader, eval_func=lambda _model: 1.0
    )
    strategy._prepare_tuning()
    return strategy


def _excluded(tune_cfg: dict, order: list[OpKey], spec: PassSpec) -> list[ExcludedOp]:
    """INC's fp32 ops with the spec's reasons; refuse a config that disagrees with the spec."""
    fp32 = {module_name(k[0]): k for k in kept_fp32(tune_cfg)}
    by_spec = {e.op_name: e for e in spec.excluded}
    quantized_anyway = sorted(set(by_spec) - set(fp32))
    if quantized_anyway:
        raise CaptureError(
            f"INC quantizes ops that params keep fp32: {quantized_anyway[:5]}; INC's op_name_dict matching "
            f"differs from engines.contract.exclusion_reason (expected neural-compressor=={REQUIRED_INC})"
        )
    return [
        ExcludedOp(k[0], k[1], by_spec[module].reason if module in by_spec else CAPABILITY_REASON)
        for k in order
        if (module := module_name(k[0])) in fp32
    ]


def run_pass(
    model: nn.Module,
    spec: PassSpec,
    *,
    workspace: Path,
    on_call: Callable[[Capture], None] | None = None,
) -> PassResult:
    """Both phases, once each, through INC's own ``calculate_op_sensitivity``; values captured."""
    util = inc_util()
    model.float()  # INC's FX path computes in float32 on the CPU, whatever the checkpoint stores
    p = spec.params
    loader = CalibrationLoader(list(spec.batches), p.batch_size)
    strategy = build_strategy(
        model, loader, spec.confidence_batches, p.tolerable_loss, p.op_type_dict, p.op_name_dict, workspace
    )
    tune_cfg = initial_tune_cfg(strategy, len(loader) * loader.batch_size)
    order = _module_order(tune_cfg["op"], spec.module_order)
    tune_cfg["op"] = {k: tune_cfg["op"][k] for k in order}
    excluded = _excluded(tune_cfg, order, spec)
    if p.native.requant_mode != "cumulative":
        log.info(
            "requant_mode %s applies to the native engine only; INC's requant phase is cumulative",
            p.native.requant_mode,
        )
    all_fp32 = copy.deepcopy(tune_cfg)
    for cfg in all_fp32["op"].values():
        for part in ("weight", "activation"):
            if part in cfg:
                cfg[part]["dtype"] = "fp32"
    util.op_cfg_mapping.clear()  # module-global int8 qconfigs; stale entries from an earlier model would leak
    seconds = {}
    log.info(
        "forced mse_v2 pass: %d ops scored per phase, %d kept fp32, %d confidence batches",
        len(order) - len(excluded),
        len(excluded),
        spec.confidence_batches,
    )
    with heap_frozen(), capture_mse(on_call) as capture, patch_embed_compat() as conv_note:
        for phase, cfg, extra in (
            (FALLBACK, tune_cfg, {}),
            (REQUANT, all_fp32, {"requantize_cfgs": tune_cfg["op"]}),
        ):
            start = time.perf_counter()
            strategy.adaptor.calculate_op_sensitivity(
                strategy.model,
                loader,
                copy.deepcopy(cfg),
                None,
                spec.confidence_batches,
                fallback=phase == FALLBACK,
                **extra,
            )
            seconds[phase] = time.perf_counter() - start
    check_capture(capture, spec.confidence_batches)
    conv_types = {k[1] for k in order}
    conv_handling = conv_note if "Conv3d" in conv_types else "no Conv3d in the config"
    if any(e.op_type == "Conv3d" for e in excluded):
        conv_handling = "Conv3d kept fp32 by params (not scored)"
    return PassResult(
        capture,
        order,
        excluded,
        order[-1][0],
        conv_handling,
        quantization_scheme(tune_cfg),
        runtime={"seconds": seconds},
    )


def ptq_model(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    batch_size: int,
    op_name_dict: dict[str, Any],
    workspace: Path,
):
    """INC's own static PTQ (``quantization.fit``) with a keep-list, as a user of our export runs it;
    INC's quantized model (``PyTorchFXModel``: ``.model`` the module, ``.q_config`` its config).

    Calibrates on ``batches`` (every sample: ``batch_size`` only sets INC's iteration count), keeps
    the ``op_name_dict`` ops fp32. No accuracy loop: ``fit`` without an evaluation function
    returns its first quantized model. ``model`` is cast to float32, and INC (no evaluation
    function: ``performance_only``) converts it in place: pass a copy you do not need any more.
    """
    inc_util()
    from neural_compressor import PostTrainingQuantConfig, quantization
    from neural_compressor.config import options

    options.workspace = str(workspace)
    model.float()
    conf = PostTrainingQuantConfig(
        approach="static",
        op_name_dict=inc_op_names(op_name_dict) or None,
        calibration_sampling_size=[len(batches) * batch_size],
    )
    calibration = CalibrationLoader([_on_cpu(b) for b in batches], batch_size)
    with patch_embed_compat():
        q = quantization.fit(model, conf, calib_dataloader=calibration)
    if q is None:
        raise CaptureError("INC's quantization.fit returned no model for the keep-list's config")
    release_quantization_caches()
    return q


def ptq_logits(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    batch_size: int,
    op_name_dict: dict[str, Any],
    workspace: Path,
) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """The forward (logits) of INC's PTQ of ``model`` with a keep-list (:func:`ptq_model`).

    INC computes on the CPU in float32: inputs prepared for another device or dtype (the native
    engine's numerics) are moved there, and the logits moved back, so the two models are scored
    by the same code.
    """
    return quantized_logits(ptq_model(model, batches, batch_size, op_name_dict, workspace).model)


def quantized_logits(
    quantized: nn.Module, compat: bool = True
) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """The forward of an INC-quantized model (fresh from PTQ or reloaded by :func:`load_q_model`):
    CPU float32 inputs, logits back on the caller's device. ``compat``: the patch embedding's
    compat patch on, as during the PTQ (its Conv3d may be a quantized module); a model from
    :func:`load_q_model` runs without it, as a user's process runs it (its patch embedding was
    traced under the patch)."""

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = batch["input_ids"].device
        with patch_embed_compat() if compat else contextlib.nullcontext():
            return quantized(**_on_cpu(batch)).logits.to(device)

    return forward


SAVED_MODEL = "best_model.pt"  # what INC 3.7.1's PyTorchFXModel.save writes (weights + "best_configure")
SAVED_CONFIG_KEY = "best_configure"


def save_q_model(q_model, out_dir: Path) -> Path:
    """INC's own save (``q_model.save(dir)``), as the original INC workflow's optional ``q_model.pt``.

    INC 3.7.1 (2.x API, ``pytorch_fx``) writes ONE file, ``best_model.pt``: the quantized model's
    ``state_dict`` (int8 weights with their scales, the calibrated activation scales and zero
    points) with INC's tuning config under the key ``best_configure`` (no ``best_configure.json``:
    that is INC's IPEX backend). INC logs and swallows an ``IOError`` while saving, so the file is
    checked here.
    """
    q_model.save(str(out_dir))
    path = out_dir / SAVED_MODEL
    if not path.is_file():
        raise CaptureError(f"{out_dir}: INC's q_model.save wrote no {SAVED_MODEL} (see INC's log)")
    return path


def saved_config(out_dir: Path) -> dict[str, Any]:
    """INC's tuning config stored in a saved q_model (``best_configure``), read without building
    the model (``weights_only``: tensors and plain containers; ``mmap``: the weights stay on disk)."""
    path = out_dir / SAVED_MODEL
    if not path.is_file():
        raise InputError(f"{out_dir}: no {SAVED_MODEL} (not a q_model saved by INC's q_model.save)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises several kinds for a damaged or foreign file
        raise InputError(f"{path}: does not load as an INC q_model ({type(e).__name__}: {e})") from e
    config = state.get(SAVED_CONFIG_KEY) if isinstance(state, dict) else None
    if not isinstance(config, dict) or not isinstance(config.get("op"), dict):
        raise InputError(
            f"{path}: no {SAVED_CONFIG_KEY} with per-op configs (not saved by INC's q_model.save)"
        )
    return config


def int8_and_fp32(config: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The modules an INC tuning config quantizes and those it keeps fp32 (module names, config
    order): an op is int8 unless its weight (or, weight-less, its activation) is fp32; an
    Embedding (int8 weight, fp32 activation) is quantized."""
    int8, fp32 = [], []
    for (op_name, _), cfg in config["op"].items():
        (fp32 if _is_fp32(cfg) else int8).append(module_name(op_name))
    return int8, fp32


def load_q_model(out_dir: Path, fp32_model: nn.Module) -> nn.Module:
    """INC's own loader (``neural_compressor.utils.pytorch.load``) of a saved q_model onto a fresh
    float32 copy of the model it was quantized from.

    The loader replays INC's conversion from the stored config: whole-model FX tracing of
    Qwen2.5-VL fails, so INC quantized (and reloads) the sub-modules listed in its config's
    ``fx_sub_module_list``, tracing each; the patch embedding's compat patch is on, as during the
    PTQ. The state dict must then load strictly: INC falls back to ``strict=False`` and ignores
    missing keys (a calibrated scale left at its default), so missing keys are refused here.

    Why INC's ``load`` alone does not serve it: the patch embedding is one of the traced
    sub-modules, and transformers' ``Qwen2_5_VisionPatchEmbed.forward`` reads
    ``self.proj.weight.dtype``. Traced as written, that read stays in the graph, and on the
    quantized Conv3d ``weight`` is a method: the first forward fails with "'function' object has no
    attribute 'dtype'". Traced under the patch (no dtype read; the cast it skips is float32 to
    float32), the returned model runs anywhere after, with no patch.
    """
    inc_util()
    from neural_compressor.utils.pytorch import load

    path = out_dir / SAVED_MODEL
    config = saved_config(out_dir)
    if config.get("framework") != "pytorch_fx":
        raise InputError(f"{path}: framework {config.get('framework')!r}, expected pytorch_fx")
    fp32_model.float().eval()
    with patch_embed_compat():
        model = load(str(out_dir), fp32_model)
    expected = set(torch.load(path, map_location="cpu", weights_only=True, mmap=True)) - {SAVED_CONFIG_KEY}
    missing = sorted(set(model.state_dict()) ^ expected)
    if missing:
        raise CaptureError(
            f"{path}: INC's loader built a model whose state differs from the saved one (first keys: "
            f"{missing[:5]}); expected neural-compressor=={REQUIRED_INC}"
        )
    return model.eval()


def _on_cpu(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch as INC's CPU float32 model takes it."""
    return {k: v.cpu().float() if v.is_floating_point() else v.cpu() for k, v in batch.items()}
