"""The fake-quantized model: each scored op computes INT8 or float on a toggle, as INC's model would.

Why toggles: INC deep-copies the model and re-runs ``prepare_fx``/``convert_fx`` for every op;
here each scored module's forward is replaced once, and a trial flips a flag.

What is replicated (INC 3.7.1 PyTorch FX defaults on CPU, read from ``pytorch_cpu.yaml``,
``_cfg_to_qconfig`` / ``_observer`` and from the converted sub-graphs it produces for Qwen2.5-VL):

* Linear / Conv3d: weight int8 symmetric per output channel from min/max
  (``PerChannelMinMaxObserver(qint8, per_channel_symmetric)``); input and output activations uint8
  asymmetric per tensor from ``HistogramObserver`` (INC's ``kl`` default), ``reduce_range`` as INC
  decides it (7-bit activations on CPUs without AVX512-VNNI). INC's converted sub-graphs are
  ``quantize(input) -> quantized op -> dequantize`` per module, so each module fake-quantizes its
  input, weight and output; modules reading the same tensor (gate_proj/up_proj) get identical
  input qparams, as INC's shared observer gives them.
* Embedding: weight-only, uint8 per row with float qparams
  (``per_channel_affine_float_qparams``); output fp32.
* Calibration: INC prepares each trial with observers and runs the same batch through a model
  that is still fp32 while observing, so every trial sees fp32 statistics; we observe once per
  batch and reuse the qparams for all trials of that batch.

Arithmetic (``arithmetic``): ``int8_kernels`` (CPU) runs each enabled op through torch's own
quantized modules (``torch.ao.nn.quantized.Linear`` / ``Conv3d`` on the x86 engine) built from the
same qparams - the kernels INC's converted model calls, so values match INC to the bit where the
inputs match. ``fake_quant`` (any device, the GPU path) quantize-dequantizes input, weight and
output in float: the only difference is the rounding of the int32 -> uint8 requantization step,
measured at 1 LSB in about 0.2 % of a Linear's outputs. INC's "double check" second pass is not
replicated.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..schemes import Scheme
from ..schemes import inc_cpu as inc_scheme
from .schemed import SchemeQuant
from .weight_copies import WeightCopies


def _fq_tensor(x: torch.Tensor, qp: tuple[torch.Tensor, torch.Tensor, int, int]) -> torch.Tensor:
    scale, zero_point, qmin, qmax = qp
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)


def fake_quant_weight(weight: torch.Tensor, op_type: str) -> torch.Tensor:
    """The weight INC's quantized module computes with, dequantized (same observer, same rounding)."""
    w = weight.detach().float()
    if op_type == "Embedding":
        # Read the table back through torch's own quantized Embedding kernel (CPU): its row-wise
        # dequantization (q * scale + bias) differs from (q - zp) * scale in the last float bit,
        # and such a bit flips rounding downstream.
        cpu = w.cpu()
        obs = torch.ao.quantization.PerChannelMinMaxObserver(
            ch_axis=0, dtype=torch.quint8, qscheme=torch.per_channel_affine_float_qparams
        )
        obs(cpu)
        scale, zero_point = obs.calculate_qparams()
        qweight = torch.quantize_per_channel(cpu, scale, zero_point, 0, torch.quint8)
        table = torch.ao.nn.quantized.Embedding(cpu.shape[0], cpu.shape[1], _weight=qweight)
        return table(torch.arange(cpu.shape[0])).to(weight.device, weight.dtype)
    obs = torch.ao.quantization.PerChannelMinMaxObserver(
        ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric
    ).to(w.device)
    obs(w)
    scale, zero_point = obs.calculate_qparams()
    return torch.fake_quantize_per_channel_affine(
        w, scale.float(), zero_point.to(torch.int32), 0, -128, 127
    ).to(weight.dtype)


def _act_observer(reduce_range: bool) -> torch.ao.quantization.HistogramObserver:
    return torch.ao.quantization.HistogramObserver(
        dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=reduce_range
    )


def _qparams(obs) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The observer's qparams, searched on the CPU and put back where its histogram was.

    Why: the histogram observer's min/max search walks the bins one scalar comparison at a time;
    on a GPU each comparison is a device sync, which made the calibration of a full-size model
    cost seconds per phase. The search reads only the small histogram, so it runs on the CPU.
    """
    device = obs.histogram.device
    scale, zero_point = obs.cpu().calculate_qparams()
    # The clamp is the dtype's range, not the observer's: ``reduce_range`` halves the range the
    # scale is computed for (0..127), but torch's quantize_per_tensor, which INC's converted
    # model runs, clamps to all of quint8 (0..255), so a value above the histogram's clipping
    # point keeps codes 128..255 there. Clamping at 127 moved the 7-bit default's requant
    # curve by up to 25 % against INC (issue 31).
    info = torch.iinfo(obs.dtype)
    qmin, qmax = info.min, info.max
    return (
        scale.float().reshape(()).to(device),
        zero_point.to(torch.int32).reshape(()).to(device),
        int(qmin),
        int(qmax),
    )


def _quantized_module(op: _Op, weight: torch.Tensor) -> nn.Module:
    """torch's quantized Linear/Conv3d with INC's weight observer and this op's output qparams."""
    mod = op.module
    obs = torch.ao.quantization.PerChannelMinMaxObserver(
        ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric
    )
    w = weight.detach().float().cpu()
    obs(w)
    scale, zero_point = obs.calculate_qparams()
    qweight = torch.quantize_per_channel(w, scale, zero_point, 0, torch.qint8)
    bias = None if mod.bias is None else mod.bias.detach().float().cpu()
    if isinstance(mod, nn.Linear):
        q = torch.ao.nn.quantized.Linear(mod.in_features, mod.out_features, bias_=bias is not None)
    elif isinstance(mod, nn.Conv3d):
        q = torch.ao.nn.quantized.Conv3d(
            mod.in_channels,
            mod.out_channels,
            mod.kernel_size,
            mod.stride,
            mod.padding,
            mod.dilation,
            mod.groups,
            bias is not None,
        )
    else:
        raise InputError(
            f"native engine: int8_kernels arithmetic has no quantized kernel for {op.type} "
            f"({op.name}); use arithmetic fake_quant"
        )
    q.set_weight_bias(qweight, bias)
    q.scale, q.zero_point = float(op.out_qp[0]), int(op.out_qp[1])
    return q


@dataclass
class _Op:
    """One scored module. Its weight stays as stored (a bf16 checkpoint stays bf16, 2 bytes/param);
    the quantized weight is kept compact (int8 + per-channel scale, 1 byte/param; a dequantized
    table for the Embedding, as its weight-only quantization is read); a trial computes with the
    one it needs, cast to the compute dtype for that call only."""

    name: str
    type: str
    module: nn.Module
    param: nn.Parameter  # the module's own weight Parameter, put back by FakeQuantModel.remove
    weight_only: bool
    q_weight: torch.Tensor | None = None  # int8 values (fake_quant) or the dequantized table (Embedding)
    q_scale: torch.Tensor | None = None  # per-output-channel scale, shaped to broadcast over the weight
    in_qp: tuple | None = None
    out_qp: tuple | None = None
    qmodule: nn.Module | None = None  # int8_kernels arithmetic: torch's quantized module for this op
    packed_from: tuple | None = None  # the weight (storage, version) qmodule's packed weight came from
    sq: SchemeQuant | None = None  # a scheme other than inc_cpu: its quantizers for this op
    enabled: bool = False
    observers: dict[str, Any] = field(default_factory=dict)
    # batched trials (:meth:`FakeQuantModel.trials`): this op's on/off per trial, in place of ``enabled``
    per_trial: tuple[bool, ...] | None = None


def _affine(mod: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A Linear's or Conv's computation with the given weight and bias."""
    if isinstance(mod, nn.Linear):
        return F.linear(x, weight, bias)
    return mod._conv_forward(x, weight, bias)  # nn.Conv1d/2d/3d


def _functional(op: _Op, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The module's own computation, with ``weight`` in place of its stored one."""
    mod = op.module
    if isinstance(mod, nn.Embedding):
        return F.embedding(x, weight, mod.padding_idx, mod.max_norm, mod.norm_type, mod.scale_grad_by_freq)
    return _affine(mod, x, weight, mod.bias)


class _UpcastLinear(torch.autograd.Function):
    """A Linear on its stored weight upcast for this call only, whose backward upcasts it again.

    Why: autograd keeps what a backward needs until it runs. ``F.linear(x, w.to(float32))`` would
    keep the float32 copy of every Linear's weight through a gradient sweep - for a bf16 3B, about
    14 GiB on top of the model. This keeps the stored weight itself (already resident) and pays a
    second upcast in the backward. Only the input's gradient is computed: no weight is trained."""

    @staticmethod
    def forward(ctx, x, stored, bias, dtype, copies):
        ctx.save_for_backward(stored)
        ctx.dtype, ctx.copies = dtype, copies
        return F.linear(x, copies.upcast(stored, dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        (stored,) = ctx.saved_tensors
        return grad.matmul(ctx.copies.upcast(stored, ctx.dtype)), None, None, None, None


def by_trial(
    x: torch.Tensor, keys: Sequence[Hashable], run: Callable[[torch.Tensor, Hashable], torch.Tensor]
) -> torch.Tensor:
    """``run(rows, key)`` for each trial's own ``keys[t]``, the trials carried trial-major along dim 0
    of ``x`` (trial t's B rows at ``t*B .. t*B+B-1``).

    The key most trials share runs on all rows, then every other key on its own trials' rows only,
    written over them: for the fallback phase (one trial float, the rest int8) one full-size call
    and one B-row call, no gather. Only row-wise computations may run so (a dynamic per-tensor
    scale would see other trials' rows: :func:`.trial_batch.batchable` refuses those schemes).
    """
    groups: dict[Hashable, list[int]] = {}
    for t, key in enumerate(keys):
        groups.setdefault(key, []).append(t)
    ranked = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    out = run(x, ranked[0][0])
    if len(ranked) == 1:
        return out
    rows, rest = divmod(x.shape[0], len(keys))
    if rest or out.shape[0] != x.shape[0]:
        raise ValueError(f"by_trial: {x.shape[0]} rows do not split into {len(keys)} trials")
    if out is x:
        out = x.clone()
    for key, trials in ranked[1:]:
        if trials == list(range(trials[0], trials[-1] + 1)):  # one run of trials: views, no gather
            y = run(x.narrow(0, trials[0] * rows, len(trials) * rows), key)
            target = out.narrow(0, trials[0] * rows, len(trials) * rows)
            index = None
        else:
            index = torch.tensor([t * rows + j for t in trials for j in range(rows)], device=x.device)
            y, target = run(x.index_select(0, index), key), None
        if y.dtype != out.dtype:  # a single forward would hand the next op this trial's own dtype
            raise RuntimeError(f"by_trial: paths give {out.dtype} and {y.dtype}; cannot batch them")
        if index is None:
            target.copy_(y)
        else:
            out.index_copy_(0, index, y)
    return out


class FakeQuantModel:
    """Every scored module computes through :meth:`_forward`; ``set(name, on)`` toggles it in O(1).

    Memory: the model's weights as stored plus about one byte per scored parameter, where a
    resident compute-dtype copy of each weight and of its quantized version would take two
    to four times the model (``compute_dtype`` is what the activations and the upcast weights use).
    ``kept`` modules (ops the params keep in full precision) get the same per-call upcast without
    any quantization, so excluding ops never brings a resident compute-dtype copy back.
    While it is active a scored or kept module's ``weight`` is an empty placeholder in the compute dtype:
    transformers reads a tower's dtype from its first weight and casts inputs to it, which must
    not round float32 pixels to a bf16 checkpoint's dtype. Weights are only read, never written,
    so tied weights (lm_head / embed_tokens) need no copy.
    """

    def __init__(
        self,
        model: nn.Module,
        op_names: list[str],
        reduce_range: bool,
        arithmetic: str = "fake_quant",
        compute_dtype: torch.dtype = torch.float32,
        kept: list[str] = (),
        scheme: Scheme | None = None,
    ):
        modules = dict(model.named_modules())
        self.model = model
        self.scheme = scheme or inc_scheme.describe()
        generic = self.scheme.name != "inc_cpu"
        self.reduce_range = reduce_range
        self.arithmetic = arithmetic
        self.compute_dtype = compute_dtype
        self.copies = WeightCopies()  # the per-call weight copies' buffers
        self.observing = False
        self.trace: list[str] | None = None  # names of scored ops as they run (SuffixCache.learn)
        self.trial_count: int | None = None  # T while batched trials run (:meth:`trials`)
        # a first-order sweep (:mod:`.first_order`): every scored op computes both ways and taps its gradient
        self.probe: Any = None
        self.readers: dict[str, list[str]] = {}  # Scheme.shared_input: the other readers of an op's input
        self._last_read: tuple[str, torch.Tensor] | None = None
        self.ops: dict[str, _Op] = {}
        self.kept: dict[str, _Op] = {}  # never quantized: stored weight, upcast per call
        for name in op_names:
            op = self._wrap(modules[name], name)
            if generic:
                op.sq = SchemeQuant(self.scheme, self._weight(op), arithmetic, op.type, self.copies)
                op.module.forward = self._scheme_forward(op)
                self.ops[name] = op
                continue
            if arithmetic == "fake_quant" or op.weight_only:
                self._quantize_weight(op)
            op.module.forward = self._forward(op)
            self.ops[name] = op
        for name in kept:
            op = self._wrap(modules[name], name)
            op.module.forward = self._kept_forward(op)
            self.kept[name] = op

    def _wrap(self, mod: nn.Module, name: str) -> _Op:
        """The op with its stored weight; the module's ``weight`` becomes an empty placeholder."""
        op_type = type(mod).__name__
        op = _Op(name, op_type, mod, mod.weight, weight_only=op_type == "Embedding")
        mod.weight = nn.Parameter(
            torch.empty(0, dtype=self.compute_dtype, device=op.param.device), requires_grad=False
        )
        return op

    def _weight(self, op: _Op) -> torch.Tensor:
        """The stored weight in the compute dtype: a copy for this call only when the dtypes differ
        (written into a reused buffer where one may be: :mod:`.weight_copies`)."""
        return self.copies.upcast(op.param.detach(), self.compute_dtype)

    def _quantize_weight(self, op: _Op) -> None:
        """INC's weight quantization of this op, kept compact; bit-identical to a resident fake-quant copy."""
        w = self._weight(op)
        fq = fake_quant_weight(w, op.type)
        if op.weight_only:
            op.q_weight = fq
            return
        w32 = w.float()
        obs = torch.ao.quantization.PerChannelMinMaxObserver(
            ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric
        ).to(w32.device)
        obs(w32)
        scale = obs.calculate_qparams()[0].float().reshape(-1, *([1] * (w.dim() - 1)))
        op.q_weight = torch.round(fq.float() / scale).to(torch.int8)  # exact: fq is an int8 multiple of scale
        op.q_scale = scale

    def _dequantized(self, op: _Op) -> torch.Tensor:
        if op.weight_only:
            return op.q_weight
        # int8 x float32 promotes in one kernel: the same products as q.float() * scale, one
        # weight-sized temporary fewer per call
        return (op.q_weight * op.q_scale).to(self.compute_dtype)

    def _forward(self, op: _Op):
        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if self.trace is not None:
                self.trace.append(op.name)
            if self.observing:
                if not op.weight_only:
                    op.observers["in"](x.detach().float())
                out = _functional(op, x, self._weight(op))
                if not op.weight_only:
                    op.observers["out"](out.detach().float())
                return out
            if self.probe is not None:
                return self.probe.run(
                    op,
                    x,
                    functools.partial(self._float_for_grad, op),
                    lambda t: self._compute(op, t, True),
                    self._parts(op),
                )
            if op.per_trial is not None:
                return by_trial(x, op.per_trial, functools.partial(self._compute, op))
            return self._compute(op, x, op.enabled)

        return forward

    def _compute(self, op: _Op, x: torch.Tensor, enabled: bool) -> torch.Tensor:
        """The op's int8 (``enabled``) or float computation of ``x``."""
        if not enabled:
            return _functional(op, x, self._weight(op))
        if op.qmodule is not None:
            scale, zero_point = float(op.in_qp[0]), int(op.in_qp[1])
            q = torch.quantize_per_tensor(x.float(), scale, zero_point, torch.quint8)
            return op.qmodule(q).dequantize()
        if op.weight_only:
            return _functional(op, x, self._dequantized(op))
        out = _functional(op, _fq_tensor(x, op.in_qp), self._dequantized(op))
        return _fq_tensor(out, op.out_qp)

    def _float_for_grad(self, op: _Op, x: torch.Tensor) -> torch.Tensor:
        """The op in float for a gradient sweep (:mod:`.first_order`), holding no upcast weight for
        the backward (:class:`_UpcastLinear`); a scheme's float op is the plain one (its bias
        placement changes the last bits only, which a gradient does not read)."""
        if isinstance(op.module, nn.Linear) and x.requires_grad:
            return _UpcastLinear.apply(x, op.param.detach(), op.module.bias, self.compute_dtype, self.copies)
        return _functional(op, x, self._weight(op))

    def _parts(self, op: _Op) -> Callable[[torch.Tensor], dict[str, Any]] | None:
        """What AutoRound's score reads of this op: its input and weight, float and fake-quantized
        (INC's quantizers; only where this model computes INC's scheme)."""
        if op.in_qp is None and not op.weight_only:
            return None

        def parts(x: torch.Tensor) -> dict[str, Any]:
            if op.q_weight is None:  # int8_kernels arithmetic keeps no fake-quant weight: made once
                self._quantize_weight(op)
            qx = x if op.weight_only else _fq_tensor(x, op.in_qp)
            # the weights are made when the backward reads them, not held until it runs (a 3B: GiBs)
            return {
                "module": op.module,
                "x": x,
                "qx": qx,
                "w": functools.partial(self._weight, op),
                "qw": functools.partial(self._dequantized, op),
            }

        return parts

    def _scheme_forward(self, op: _Op):
        call = functools.partial(_affine, op.module)

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if self.trace is not None:
                self.trace.append(op.name)
            if self.observing:
                self._note_reader(op.name, x)
            if self.probe is not None and not self.observing:
                return self.probe.run(
                    op, x, functools.partial(self._float_for_grad, op), lambda t: run(t, False, True), None
                )
            if self.trial_count is not None and not self.observing:
                keys = [self._scheme_key(op, t) for t in range(self.trial_count)]
                return by_trial(x, keys, lambda part, key: run(part, *key))
            shared = not op.enabled and any(self.ops[s].enabled for s in self.readers.get(op.name, ()))
            return run(x, shared, op.enabled)

        def run(x: torch.Tensor, shared: bool, enabled: bool) -> torch.Tensor:
            return op.sq.run(
                call,
                x,
                functools.partial(self._weight, op),
                op.module.bias,
                quant_in=shared,
                quant_op=enabled,
                observing=self.observing,
                dtype=self.compute_dtype,
            )

        return forward

    def _on(self, op: _Op, t: int) -> bool:
        """Whether ``op`` is quantized in batched trial ``t``."""
        return op.enabled if op.per_trial is None else op.per_trial[t]

    def _scheme_key(self, op: _Op, t: int) -> tuple[bool, bool]:
        """(quant_in, quant_op) of a scheme op in batched trial ``t``: a reader of a shared input
        kept in high precision still reads it quantized in the trials where another reader is on."""
        on = self._on(op, t)
        return (not on and any(self._on(self.ops[s], t) for s in self.readers.get(op.name, ())), on)

    def _note_reader(self, name: str, x: torch.Tensor) -> None:
        """Ops reading one tensor (q/k/v, gate/up: called one after another on the same object)
        share its input quantizer where the scheme puts one per tensor (``Scheme.shared_input``)."""
        if not self.scheme.shared_input:
            return
        last = self._last_read
        if last is not None and last[1] is x:
            group = sorted({name, last[0], *self.readers.get(last[0], ())})
            for member in group:
                self.readers[member] = [m for m in group if m != member]
        self._last_read = (name, x)

    def _kept_forward(self, op: _Op):
        """The op in full precision; in a gradient sweep without a float32 copy held for the backward
        (:meth:`_float_for_grad`): a pass that keeps most ops fp32 held the whole model twice
        (the bf16 3B with 412 of 417 ops kept: 22.7 GiB, 11.6 GiB so, the same report)."""

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            return self._float_for_grad(op, x)

        return forward

    def set(self, name: str, on: bool) -> None:
        self.ops[name].enabled = on

    def set_all(self, on: bool) -> None:
        for name in self.ops:
            self.set(name, on)

    def state(self, names: list[str]) -> tuple[bool | None, ...]:
        """The ops' on/off; None for an op that differs between batched trials (no one state: the
        reuse caches neither hit nor store on a key holding None)."""
        return tuple(None if self.ops[n].per_trial is not None else self.ops[n].enabled for n in names)

    @contextlib.contextmanager
    def trials(self, per_trial: dict[str, tuple[bool, ...]]) -> Iterator[None]:
        """T trials in one forward: op ``name`` is on in trial t where ``per_trial[name][t]``; every
        other op keeps its ``enabled`` in all trials. The forward must carry the trials trial-major
        along dim 0 wherever a listed op (or, for a scheme, a reader sharing its input) runs
        (:mod:`.trial_batch` expands the batch); the per-trial flags are cleared on exit."""
        counts = {len(flags) for flags in per_trial.values()}
        if len(counts) != 1:
            raise ValueError(f"trials: every op needs one flag per trial, got lengths {sorted(counts)}")
        if self.trial_count is not None:
            raise RuntimeError("trials: batched trials are already running")
        try:
            for name, flags in per_trial.items():
                self.ops[name].per_trial = tuple(bool(f) for f in flags)
            self.trial_count = counts.pop()
            yield
        finally:
            self.trial_count = None
            for op in self.ops.values():
                op.per_trial = None

    @torch.no_grad()
    def calibrate(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """fp32 forwards with fresh observers, then fix the qparams.

        One batch per call in the sensitivity pass (what every INC trial sees); the whole
        calibration sample when a keep-list is validated (what INC's PTQ sees).
        """
        self.set_all(False)
        for op in self.ops.values():
            if op.sq is not None:
                op.sq.start()
            elif not op.weight_only:
                dev = op.param.device
                op.observers = {
                    "in": _act_observer(self.reduce_range).to(dev),
                    "out": _act_observer(self.reduce_range).to(dev),
                }
        self.observing = True
        self.readers = {}
        try:
            for batch in batches:
                self.model(**batch)
        finally:
            self.observing = False
            self._last_read = None
        for op in self.ops.values():
            if op.sq is not None:
                op.sq.freeze(op.name)
            elif not op.weight_only:
                if op.observers["in"].min_val.numel() == 0 or not torch.isfinite(op.observers["in"].min_val):
                    raise InputError(
                        f"native engine: op {op.name} did not run on the calibration batch "
                        "(keep it fp32 with sensitivity.op_name_dict)"
                    )
                op.in_qp, op.out_qp = _qparams(op.observers["in"]), _qparams(op.observers["out"])
                op.observers = {}
                if self.arithmetic == "int8_kernels":
                    self._int8_module(op)

    def _int8_module(self, op: _Op) -> None:
        """torch's quantized module for the op's current output qparams. Its packed int8 weight
        depends on the weight alone, so it is packed once and kept across calibrations and
        restores (at 3B it was 71 s of every batch's calibration: benchmarks/calibration_3b.py);
        a weight changed in place since then is packed again."""
        source = (op.param.data_ptr(), op.param._version)
        if op.qmodule is None or op.packed_from != source:
            op.qmodule = _quantized_module(op, self._weight(op))
            op.packed_from = source
        else:
            op.qmodule.scale, op.qmodule.zero_point = float(op.out_qp[0]), int(op.out_qp[1])

    def frozen(self) -> dict[str, Any]:
        """The calibrated activation qparams (a few scalars per op), to come back to this batch later."""
        return {
            name: dict(op.sq.static) if op.sq is not None else (op.in_qp, op.out_qp)
            for name, op in self.ops.items()
        }

    def restore(self, frozen: dict[str, Any]) -> None:
        """The qparams of :meth:`frozen`, as if that batch had just been calibrated (no forward)."""
        for name, qp in frozen.items():
            op = self.ops[name]
            if op.sq is not None:
                op.sq.static = dict(qp)
            elif not op.weight_only:
                op.in_qp, op.out_qp = qp
                if self.arithmetic == "int8_kernels":
                    self._int8_module(op)

    def remove(self) -> None:
        for op in [*self.ops.values(), *self.kept.values()]:
            if "forward" in vars(op.module):
                del op.module.forward
            op.module.weight = op.param
        self.set_all(False)
