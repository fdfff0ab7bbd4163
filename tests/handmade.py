"""A hand-made spectrum with known numbers: five ops, all-int8 error E = 10."""

from op_sensitivity.inventory import OpInfo
from op_sensitivity.params import FallbackParams, parse_fallback

PATCH, UP, EMBED, DOWN, HEAD = (
    "model.visual.patch_embed.proj",
    "model.visual.blocks.0.mlp.up_proj",
    "model.language_model.embed_tokens",
    "model.language_model.layers.0.mlp.down_proj",
    "lm_head",
)
INVENTORY = [
    OpInfo(PATCH, "Conv3d", [4, 3, 2, 14, 14], 100, "vision", None),
    OpInfo(UP, "Linear", [10, 20], 200, "vision", None),
    OpInfo(EMBED, "Embedding", [30, 10], 300, "text", None),
    OpInfo(DOWN, "Linear", [40, 10], 400, "text", None),
    OpInfo(HEAD, "Linear", [30, 10], 300, "lm_head", EMBED),
]
INC_NAMES = {PATCH: PATCH, UP: UP, EMBED: EMBED + ".module", DOWN: DOWN, HEAD: "lm_head.module"}
# fallback raw values (LOW = sensitive) and the requant cumulative curve (E = 10).
FALLBACK = {PATCH: 8.0, UP: 10.0, EMBED: 8.0, DOWN: 5.0, HEAD: 6.0}
REQUANT = {PATCH: 1.0, UP: 1.0, EMBED: 3.0, DOWN: 6.0, HEAD: 10.0}


def _ops(values):
    return [
        {
            "op_name": INC_NAMES[op.name],
            "module": op.name,
            "op_type": op.type,
            "tower": op.tower,
            "position": i + 1,
            "mse": values[op.name],
            "mse_per_batch": [values[op.name]],
            "rank": 0,
        }
        for i, op in enumerate(INVENTORY)
    ]


def make_report() -> dict:
    meta = {
        "versions": {"neural_compressor": "3.7.1", "torch": "2.13.0", "transformers": "5.23.0"},
        "model": {"origin": "hand-made", "params": 1300, "sha256": "0" * 64, "random_weights": True},
        "calibration": {
            "mode": "image_caption",
            "samples_used": 1,
            "manifest_records": 1,
            "batch_size": 1,
            "confidence_batches": 1,
        },
        "measured_at": "lm_head.module",
        "measure": "sum",
        "aggregation": "mean",
        "excluded_ops": [],
        "conv3d_handling": "quantized",
    }
    return {
        "schema_version": 1,
        "engine": "inc",
        "metadata": meta,
        "phases": {
            "fallback": {"ops": _ops(FALLBACK)},
            "requant": {"ops": _ops(REQUANT), "cumulative": True},
        },
    }


def fallback_params(**raw) -> FallbackParams:
    """The fallback block with every policy filled in; ``raw`` overrides keys."""
    base = {
        "phase": "fallback",
        "policy": "top_k",
        "top_k": {"k": 2},
        "top_fraction": {"fraction": 0.5},
        "threshold": {"value": 0.5, "relative": True},
        "error_budget": {"percent": 50},
        "measured_budget": {"metric": "kl", "percent": 10, "ranking": "fallback"},
        "bits_budget": {"metric": "kl", "params_share": 0.25},
    }
    base.update(raw)
    return parse_fallback(base)


# The ranking curve of the hand-made model: recovered KL share by n, the same for every ranking.
CURVE_RECOVERED = [0.0, 0.4, 0.7, 0.92, 0.97, 1.0]
RANKINGS = {
    "fallback": [DOWN, HEAD, PATCH, EMBED, UP],
    "requant": [HEAD, DOWN, EMBED, PATCH, UP],
    "measured": [DOWN, UP, HEAD, PATCH, EMBED],
}
SINGLE_OP_DAMAGE = {PATCH: 0.3, UP: 0.25, EMBED: 0.1, DOWN: 0.5, HEAD: 0.2}  # share of all-int8 KL


def make_curve() -> dict:
    none = {"top1": None, "nll": None, "logit_se": None}
    return {
        "schema_version": 2,
        "metric": "kl",
        "sizes": list(range(len(CURVE_RECOVERED))),
        "targets": [],
        "single_op_pool": {"rule": "every scored op", "ops": len(SINGLE_OP_DAMAGE)},
        "ops": [op.name for op in INVENTORY],
        "excluded": [],
        "rankings": {r: list(order) for r, order in RANKINGS.items()},  # a test may edit its copy
        "single_op": {
            m: {"values": {}, "damage_share": {"kl": d, **none}} for m, d in SINGLE_OP_DAMAGE.items()
        },
        "points": [
            {
                "ranking": r,
                "n": n,
                "kept": order[:n],
                "cost": {},
                "values": {},
                "recovered": {"kl": rec, **none},
            }
            for r, order in RANKINGS.items()
            for n, rec in enumerate(CURVE_RECOVERED)
        ],
        "random": [],
    }
