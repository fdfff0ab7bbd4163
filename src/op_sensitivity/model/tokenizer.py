"""A byte-level BPE tokenizer trained on the calibration captions, for the tiny default model.

Why train one: the real Qwen2.5 tokenizer cannot be downloaded here, and a byte-level BPE
with Qwen2.5-VL's special tokens exercises exactly the same processor and model code paths.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .processor import CALIBRATION_PROMPT, SPECIAL_TOKENS

# Words of the chat template, so prompts tokenize as compactly as captions do.
_TEMPLATE_TEXT = ("system", "user", "assistant", "You are a helpful assistant.", CALIBRATION_PROMPT)


def train_tokenizer(captions: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train deterministically on the captions; special tokens get the first ids, in Qwen's order."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*sorted(set(captions)), *_TEMPLATE_TEXT], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="right"
    )
