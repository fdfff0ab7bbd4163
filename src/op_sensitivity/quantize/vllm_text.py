"""The compressed-tensors checkpoint served by vLLM: its language tower as vLLM's Qwen2 text model.

Why the text tower alone: vLLM's Qwen2.5-VL imports torchvision, and the torchvision wheel on the
package index is built against CUDA torch, so it does not load beside the CPU torch vLLM's CPU
build pins (``operator torchvision::nms does not exist``). vLLM's Qwen2 text model needs no
torchvision. On text alone (no image tokens) the Qwen2.5-VL decoder *is* a Qwen2 decoder: its
multimodal rope gives every token the same temporal, height and width position, which is the 1-D
rope, and the weights keep their shapes. So the W8A8 codes and scales the checkpoint stores for
the decoder Linears are served as stored, and only what the text path cannot reach (the vision
tower and merger) is left out. What is and is not served is said in every result
(:data:`SERVED`, :data:`NOT_SERVED`).

:func:`text_checkpoint` writes the Qwen2 checkpoint from the Qwen2.5-VL one (tensors renamed, not
recomputed); :func:`text_only` drops the image from a test batch; :func:`caption_logprobs` reads
the log-probability of each caption token from logits, as vLLM's ``prompt_logprobs`` gives it.
The vLLM side runs in its own environment (``make vllm-env``: vLLM's CPU build pins transformers
and compressed-tensors releases older than this project's), by ``scripts/vllm_logprobs.py``,
which imports nothing of this package; :func:`serve` calls it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic import atomic_dir
from ..errors import InputError

VLLM_PYTHON = Path(".venv-vllm/bin/python")
BUILD = "make vllm-env"
SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "vllm_logprobs.py"
SERVED = "the language tower (decoder layers, embeddings, norm, lm_head) as vLLM's Qwen2ForCausalLM"
NOT_SERVED = (
    "the vision tower and merger: vLLM's Qwen2.5-VL needs torchvision, whose index wheel does not "
    "load beside the CPU torch; the captions are scored without their image"
)
# Qwen2.5-VL text config keys a Qwen2 config has under the same name
_TEXT_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "vocab_size",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "attention_dropout",
    "initializer_range",
)


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The Qwen2 ``config.json`` of a Qwen2.5-VL one's language tower (``text_config``), with the
    checkpoint's ``quantization_config`` and its ``ignore`` kept to the names the text model has."""
    text = config.get("text_config")
    if config.get("model_type") != "qwen2_5_vl" or not isinstance(text, dict):
        raise InputError(
            f"config.json: model_type {config.get('model_type')!r}, expected qwen2_5_vl with a text_config"
        )
    rope = text.get("rope_parameters") or {}
    out = {k: text[k] for k in _TEXT_KEYS if k in text}
    out |= {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "rope_theta": rope.get("rope_theta", text.get("rope_theta", 1e6)),
        "tie_word_embeddings": bool(
            config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        ),
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": text.get("max_window_layers", text["num_hidden_layers"]),
        "torch_dtype": config.get("dtype", text.get("dtype", "bfloat16")),
    }
    quant = config.get("quantization_config")
    if quant is not None:
        quant = dict(quant)
        quant["ignore"] = sorted(
            {_text_name(n) for n in quant.get("ignore", []) if _text_name(n) is not None}
        )
        out["quantization_config"] = quant
    return out


def _text_name(name: str) -> str | None:
    """A checkpoint or module name of the Qwen2.5-VL model as the Qwen2 model names it; None for a
    vision one (``visual.*``, ``model.visual.*``)."""
    if name.startswith(("visual.", "model.visual.")):
        return None
    if name.startswith("model.language_model."):
        return "model." + name.removeprefix("model.language_model.")
    return name


def text_checkpoint(vl_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Write ``out_dir``: the Qwen2 text checkpoint of the compressed-tensors Qwen2.5-VL one at
    ``vl_dir`` (every text tensor as stored, the vision ones left out; the tokenizer files copied).
    Returns ``{tensors, dropped, quantized}``: the tensors written, the vision tensors left out,
    and the Linears stored as int8 codes (by their text names)."""
    config_file = vl_dir / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{config_file}: not readable as a checkpoint config ({e})") from e
    tensors: dict[str, torch.Tensor] = {}
    dropped = []
    files = sorted(vl_dir.glob("*.safetensors"))
    if not files:
        raise InputError(f"{vl_dir}: no *.safetensors files")
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - a safe_open handle is not a mapping
                name = _text_name(key)
                if name is None:
                    dropped.append(key)
                else:
                    tensors[name] = handle.get_tensor(key)
    quantized = sorted(k.removesuffix(".weight_scale") for k in tensors if k.endswith(".weight_scale"))
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(text_config(config), indent=2))
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (vl_dir / name).exists():
                shutil.copy2(vl_dir / name, tmp / name)
    return {"tensors": len(tensors), "dropped": len(dropped), "quantized": quantized}


def image_tokens(config: Any) -> set[int]:
    """The ids a text-only prompt leaves out: the image and video pads and the vision markers."""
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return {getattr(config, n) for n in names}


def text_only(
    batch: dict[str, torch.Tensor], mask: torch.Tensor, image_tokens: set[int]
) -> tuple[list[int], list[bool]]:
    """One sample's prompt without its image: the ids (image, vision start and end tokens removed,
    padding dropped) and the caption mask on what is left."""
    if batch["input_ids"].shape[0] != 1:
        raise ValueError("text_only takes batches of one sample")
    ids = batch["input_ids"][0].tolist()
    keep = [
        bool(a) and i not in image_tokens
        for i, a in zip(ids, batch["attention_mask"][0].tolist(), strict=True)
    ]
    return [i for i, k in zip(ids, keep, strict=True) if k], [
        bool(m) for m, k in zip(mask[0].tolist(), keep, strict=True) if k
    ]


def caption_logprobs(logits: torch.Tensor, ids: list[int], mask: list[bool]) -> list[float]:
    """The log-probability of each caption token given the tokens before it (``logits``: [tokens,
    vocab] of the prompt ``ids``): what vLLM's ``prompt_logprobs`` gives for those positions."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return [float(logp[t - 1, ids[t]]) for t in range(1, len(ids)) if mask[t]]


def vllm_python() -> Path:
    """The vLLM environment's interpreter; a missing one stops with the command that builds it."""
    python = Path(os.environ.get("OP_SENSITIVITY_VLLM_PYTHON", VLLM_PYTHON))
    if not python.exists():
        raise InputError(f"vLLM environment: {python} not found (build it with `{BUILD}`)")
    return python


def serve(model_dir: Path, prompts: list[list[int]], *, timeout: float = 3600) -> dict[str, Any]:
    """vLLM's offline engine on ``model_dir`` (CPU): the prompt log-probabilities of every prompt
    and what the loaded model quantizes, read off vLLM's own modules (``scripts/vllm_logprobs.py``)."""
    python = vllm_python()
    with tempfile.TemporaryDirectory(prefix="vllm_") as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({"model": str(model_dir), "prompts": prompts}))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        done = subprocess.run(
            [str(python), str(SCRIPT), str(request), str(result)],
            env=env,
            timeout=timeout,
            stdout=sys.stderr,
            stderr=subprocess.STDOUT,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"vLLM ({python} {SCRIPT.name}) exited with {done.returncode}; its log is above"
            )
        return json.loads(result.read_text())


# vLLM fuses these projections into one layer each; its module name for a Qwen2 module
_FUSED = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


def vllm_module(name: str) -> str | None:
    """A Qwen2.5-VL module as vLLM's Qwen2 names the layer that computes it; None for a vision one."""
    text = _text_name(name)
    if text is None:
        return None
    head, _, last = text.rpartition(".")
    return f"{head}.{_FUSED.get(last, last)}" if head else text


def float_layers(linear: dict[str, str], quantized_scheme: str = "CompressedTensorsW8A8Int8") -> set[str]:
    """The decoder-layer linears vLLM's loaded model runs unquantized (``linear``: the script's
    module -> method map), where the rest run ``quantized_scheme``."""
    return {n for n, m in linear.items() if ".layers." in n and m != quantized_scheme}


def text_split(
    batches: list[tuple[dict, torch.Tensor]], image_tokens: set[int]
) -> list[tuple[dict, torch.Tensor]]:
    """A held-out split's samples without their images, one sample a batch (a Measurer's split)."""
    out = []
    for batch, mask in batches:
        for b in range(batch["input_ids"].shape[0]):
            one = {k: batch[k][b : b + 1] for k in ("input_ids", "attention_mask")}
            ids, keep = text_only(one, mask[b : b + 1], image_tokens)
            out.append(
                (
                    {
                        "input_ids": torch.tensor([ids]),
                        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                    },
                    torch.tensor([keep]),
                )
            )
    return out


def predicted_logprobs(measurer: Any, keep: list[str] | None) -> list[list[float]]:
    """The native engine's caption log-probabilities on the measurer's held-out (text-only) split:
    every scored op int8 but ``keep``; ``keep=None``: float32 (every op float)."""
    for name in measurer.scored:
        measurer.fq.set(name, keep is not None and name not in keep)
    out = []
    with torch.no_grad():
        for batch, mask in measurer.splits[measurer.held_out]:
            logits = measurer.model(**batch).logits[0]
            out.append(caption_logprobs(logits, batch["input_ids"][0].tolist(), mask[0].tolist()))
    return out


def served_logprobs(
    result: dict[str, Any], prompts: list[list[int]], masks: list[list[bool]]
) -> list[list[float]]:
    """vLLM's prompt log-probabilities at the caption tokens, in :func:`caption_logprobs`' order."""
    return [
        [lp for lp, m in zip(row, mask, strict=True) if m]
        for row, mask in zip(result["logprobs"], masks, strict=True)
    ]


def compare(a: list[list[float]], b: list[list[float]]) -> dict[str, float]:
    """Two runs' caption log-probabilities: the NLL of each (mean over tokens) and their token-wise
    difference (largest and mean absolute)."""
    x, y = (
        torch.tensor([v for row in a for v in row], dtype=torch.float64),
        torch.tensor([v for row in b for v in row], dtype=torch.float64),
    )
    d = (x - y).abs()
    return {
        "nll_a": float(-x.mean()),
        "nll_b": float(-y.mean()),
        "max_abs": float(d.max()),
        "mean_abs": float(d.mean()),
    }


VLLM_DIVISOR = 127.0  # vLLM's dynamic per-token scale: amax / 127 (compressed-tensors' QDQ: amax / 127.5)


def emulated_logprobs(
    float_dir: Path,
    w8a8_dir: Path,
    prompts: list[list[int]],
    masks: list[list[bool]],
    divisor: float,
    reciprocal: bool = False,
    jitter_seed: int | None = None,
) -> list[list[float]]:
    """Caption log-probabilities of the W8A8 text checkpoint computed in torch as vLLM's CPU kernel
    does it, one cause at a time: the stored int8 codes x scales as weights, each input quantized
    per token with scale ``amax / divisor`` (rounded half to even, clamped to int8), the matmul in
    float32. ``divisor`` 127.5 and ``x / scale`` are compressed-tensors' QDQ (the native
    prediction's arithmetic); 127 and ``reciprocal`` (``x * (1 / scale)``) vLLM's
    (``_custom_ops.onednn_scaled_int8_quant``, matched code for code on a 3B-width layer's input
    here). The two differ only where the exact quotient ``127 x / amax`` is a tie (k + 0.5), which
    each float32 evaluation misses by an ulp on its own side: activations made from bfloat16
    weights hit such ties often, float32 ones almost never. What is left against vLLM
    is its int32 GEMM and summation order.

    ``jitter_seed``: each quantized input first moved by one float32 ulp up or down (seeded, per
    element), the size of a difference in summation order. Against the run without it, this is the
    floor below which no emulation can match another float32 implementation: a value within an ulp
    of a rounding boundary flips its code, and the flip propagates."""
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(float_dir, dtype=torch.float32, local_files_only=True).eval()
    hooks = []
    with safe_open(str(w8a8_dir / "model.safetensors"), framework="pt") as f:
        names = [k.removesuffix(".weight_scale") for k in f.keys() if k.endswith(".weight_scale")]  # noqa: SIM118
        for name in names:
            linear = model.get_submodule(name)
            codes, scale = f.get_tensor(f"{name}.weight"), f.get_tensor(f"{name}.weight_scale")
            linear.weight.data = codes.float() * scale.float()
            if jitter_seed is not None:
                hooks.append(linear.register_forward_pre_hook(_ulp_jitter(jitter_seed)))
            hooks.append(linear.register_forward_pre_hook(_per_token_int8(divisor, reciprocal)))
    out = []
    try:
        with torch.no_grad():
            for ids, mask in zip(prompts, masks, strict=True):
                logits = model(input_ids=torch.tensor([ids])).logits[0]
                out.append(caption_logprobs(logits, ids, mask))
    finally:
        for h in hooks:
            h.remove()
    return out


def _ulp_jitter(seed: int):
    generator = torch.Generator().manual_seed(seed)

    def hook(_module, args):
        (x,) = args
        up = torch.randint(0, 2, x.shape, generator=generator, dtype=torch.bool)
        return (torch.where(up, torch.nextafter(x, x + 1), torch.nextafter(x, x - 1)),)

    return hook


def _per_token_int8(divisor: float, reciprocal: bool = False):
    def hook(_module, args):
        (x,) = args
        scale = x.abs().amax(dim=-1, keepdim=True) / divisor
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        scaled = x * (1.0 / scale) if reciprocal else x / scale
        return (torch.clamp(torch.round(scaled), -128, 127) * scale,)

    return hook
