"""Prompt log-probabilities from vLLM's offline engine, and what its loaded model quantizes.

Runs in the vLLM environment (``make vllm-env``), not the project's: it imports nothing of
op_sensitivity. ``op_sensitivity.quantize.vllm_text.serve`` writes the request and reads the result.

    .venv-vllm/bin/python scripts/vllm_logprobs.py request.json result.json

request: ``{"model": dir, "prompts": [[token id, ...], ...]}``. result: ``{"vllm": version,
"logprobs": [[float | null, ...], ...]`` (per prompt, per token: log P(token | the tokens before);
null for the first), ``"linear": {module: quant method class}`` (every linear layer of the model
vLLM loaded, read off the model in its worker), ``"seconds": {"load": s, "score": s}}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

# one process (the model is then reachable from here), and the CPU backend's KV cache kept small
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


def linear_methods(model) -> dict[str, str]:
    """Each linear layer's quantization method, as vLLM runs it (``quant_method`` of its
    ``LinearBase`` modules: ``UnquantizedLinearMethod`` for one the checkpoint left float)."""
    out = {}
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is None or not hasattr(module, "weight"):
            continue
        scheme = getattr(module, "scheme", None)
        out[name] = type(scheme).__name__ if scheme is not None else type(method).__name__
    return out


def main(request_file: str, result_file: str) -> None:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    request = json.loads(Path(request_file).read_text())
    start = time.perf_counter()
    longest = max(len(p) for p in request["prompts"])
    llm = LLM(
        model=request["model"],
        tokenizer=request["model"],
        dtype="float32",
        max_model_len=max(64, longest + 1),
        enforce_eager=True,
        max_logprobs=1,
    )
    loaded = time.perf_counter()
    linear = llm.apply_model(linear_methods)[0]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in request["prompts"]], params, use_tqdm=False
    )
    logprobs = []
    for prompt, out in zip(request["prompts"], outputs, strict=True):
        row = []
        for t, entry in enumerate(out.prompt_logprobs):
            row.append(None if entry is None else entry[prompt[t]].logprob)
        logprobs.append(row)
    Path(result_file).write_text(
        json.dumps(
            {
                "vllm": vllm.__version__,
                "logprobs": logprobs,
                "linear": linear,
                "seconds": {"load": loaded - start, "score": time.perf_counter() - loaded},
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
