"""``llmcompressor_w8a8``: compressed-tensors' ``W8A8`` preset, the int8 scheme vLLM serves.

llmcompressor itself cannot sit beside INC 3.7.1 (it pins transformers<=5.17 and numpy>=2), so
the scheme is read from compressed-tensors, which llmcompressor writes its configs with: weights
int8 symmetric per output channel (static), input activations int8 symmetric per token
(dynamic), no output quantizer.
"""

from __future__ import annotations

from typing import Any

from ..errors import InputError
from .spec import GRANULARITIES, QuantSpec, Scheme

EXTRA = "pip install -e '.[ct]'"
PRESET = "W8A8"


def _spec(args: Any) -> QuantSpec:
    if args.type != "int" or args.num_bits != 8:
        raise InputError(f"compressed-tensors preset {PRESET}: {args.type}{args.num_bits} is not int8")
    strategy = str(getattr(args.strategy, "value", args.strategy))
    if strategy not in GRANULARITIES:
        raise InputError(
            f"compressed-tensors preset {PRESET}: strategy {strategy!r} is not tensor/channel/token"
        )
    return QuantSpec("int8", strategy, symmetric=bool(args.symmetric), dynamic=args.dynamic is True)


def describe() -> Scheme:
    try:
        from compressed_tensors.quantization import preset_name_to_scheme
    except ImportError as exc:
        raise InputError(f"scheme llmcompressor_w8a8: compressed-tensors is not installed ({EXTRA})") from exc
    preset = preset_name_to_scheme(PRESET, ["Linear"])
    return Scheme(
        name="llmcompressor_w8a8",
        library="compressed-tensors",
        weights=_spec(preset.weights),
        inputs=_spec(preset.input_activations),
        outputs=None if preset.output_activations is None else _spec(preset.output_activations),
        op_types=("Linear",),
        skip=("lm_head",),
        source=f"compressed_tensors.quantization.preset_name_to_scheme({PRESET!r})",
        notes=(
            "per-token scales reduce the last dimension; compressed-tensors' own TOKEN strategy keeps "
            "dims 0 and 1, so on a 2-D activation (the vision tower's) it reduces nothing",
        ),
    )
