"""The scheme schema: a :class:`Scheme` holds one :class:`QuantSpec` per quantizer position.

``QuantSpec`` fields:

* ``dtype``: ``int8`` | ``uint8`` | ``fp8_e4m3``.
* ``granularity``: ``tensor`` | ``channel`` (weights: one scale per output channel) | ``token``
  (activations: one scale per row of the last dimension).
* ``symmetric``: zero point 0 (int) - fp8 is always symmetric.
* ``dynamic``: scales from each call's own tensor (no calibration).
* ``observer``: ``minmax`` | ``histogram`` (static ranges: how calibration picks them).
* ``narrow_range``: int8 over [-127, 127] instead of [-128, 127].
* ``scale_rule``: how the tool writes its QDQ, which decides the last bit:
  ``range`` - scale = (max - min) / (qmax - qmin) (0 kept in range, +-amax when symmetric),
  q = round(x / scale) + zp, back as (q - zp) * scale (ONNX, compressed-tensors, torch);
  ``amax`` - a multiplier m = qmax / amax, q = round(x * m), back as q / m (ModelOpt; fp8:
  x * (448 / amax) saturated, cast to e4m3, times 1 / m).
* ``scale_precision``: ``float32`` | ``float64`` (ONNX Runtime computes scales in float64).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InputError

DTYPES = ("int8", "uint8", "fp8_e4m3")
GRANULARITIES = ("tensor", "channel", "token")
OBSERVERS = ("minmax", "histogram")
SCALE_RULES = ("range", "amax")


@dataclass(frozen=True)
class QuantSpec:
    dtype: str
    granularity: str
    symmetric: bool
    dynamic: bool = False
    observer: str = "minmax"
    narrow_range: bool = False
    scale_rule: str = "range"
    scale_precision: str = "float32"

    def __post_init__(self) -> None:
        for name, value, allowed in [
            ("dtype", self.dtype, DTYPES),
            ("granularity", self.granularity, GRANULARITIES),
            ("observer", self.observer, OBSERVERS),
            ("scale_rule", self.scale_rule, SCALE_RULES),
            ("scale_precision", self.scale_precision, ("float32", "float64")),
        ]:
            if value not in allowed:
                raise InputError(f"QuantSpec.{name}: {value!r}, expected one of {list(allowed)}")
        if self.dtype == "fp8_e4m3" and (not self.symmetric or self.scale_rule != "amax"):
            raise InputError("QuantSpec: fp8_e4m3 is symmetric with scale_rule 'amax' (448 / amax)")


BIAS = ("float", "onnx_export")


@dataclass(frozen=True)
class Scheme:
    """One deployment tool's W8A8 scheme. ``outputs`` None: the tool does not requantize an op's
    output (the next op quantizes its own input); ``skip``: fnmatch globs of module names the tool
    leaves in high precision by default; ``source``: where the description was read.

    Where the quantizers sit in the tool's graph:

    * ``shared_input``: one input quantizer per tensor, not per op (ONNX Runtime puts one Q/DQ pair
      on a tensor and rewires every reader to it), so an op kept in high precision still reads
      its input quantized while another reader of the same tensor (q/k/v, gate/up) is quantized.
    * ``bias``: ``float`` - the bias is added in float before any output quantizer; ``onnx_export``
      - as ``torch.onnx.export`` writes a Linear: on a 2-D input one Gemm whose bias ORT stores as
      int32 (scale = input scale x weight scale) with the output Q/DQ after it, on a 3-D input a
      MatMul whose output Q/DQ comes before the float bias Add.
    """

    name: str
    library: str
    weights: QuantSpec
    inputs: QuantSpec | None
    outputs: QuantSpec | None
    op_types: tuple[str, ...]
    skip: tuple[str, ...] = ()
    source: str = ""
    notes: tuple[str, ...] = field(default=())
    shared_input: bool = False
    bias: str = "float"

    def __post_init__(self) -> None:
        if self.bias not in BIAS:
            raise InputError(f"Scheme.bias: {self.bias!r}, expected one of {list(BIAS)}")
