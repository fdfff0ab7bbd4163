"""Image-only Qwen2.5-VL processor: tokenizer + ``Qwen2VLImageProcessorPil`` + chat template.

Why not ``Qwen2_5_VLProcessor``: it requires a video processor, which needs torchvision, and
torchvision does not import beside this project's torch build; ``AutoProcessor`` then silently
returns only the tokenizer. This class does the one thing calibration needs: turn
(caption, image) pairs into the model's inputs, expanding ``<|image_pad|>`` to one token per
merged patch exactly as the official processor does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..errors import InputError

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    VISION_START,
    VISION_END,
    "<|vision_pad|>",
    IMAGE_PAD,
    VIDEO_PAD,
)
CALIBRATION_PROMPT = "Describe this image."
ASSISTANT_TURN = "<|im_start|>assistant\n"

# Qwen2-VL's chat template without the video branch (we never feed video).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def calibration_messages(caption: str, with_image: bool) -> list[dict]:
    """The chat a calibration sample is: the user shows the image, the assistant gives the caption."""
    user = (
        [{"type": "image"}, {"type": "text", "text": CALIBRATION_PROMPT}]
        if with_image
        else [{"type": "text", "text": CALIBRATION_PROMPT}]
    )
    return [
        {"role": "user", "content": user},
        {"role": "assistant", "content": [{"type": "text", "text": caption}]},
    ]


def image_token_types(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """``mm_token_type_ids``: 1 where a token is the image's (``<|image_pad|>``), 0 elsewhere, as
    ``ProcessorMixin.create_mm_token_type_ids`` marks it (int64, as its batch returns it)."""
    return (input_ids == image_token_id).long()


@dataclass
class ImageTextProcessor:
    tokenizer: PreTrainedTokenizerBase
    image_processor: Qwen2VLImageProcessorPil
    chat_template: str

    @property
    def merge_size(self) -> int:
        return int(self.image_processor.merge_size)

    def _texts(
        self, captions: Sequence[str], images: Sequence[Image.Image] | None
    ) -> tuple[list[str], dict[str, torch.Tensor] | None]:
        """The model's text per sample (image pads expanded) and the image processor's output."""
        if images is None:
            return list(captions), None
        if len(images) != len(captions):
            raise ValueError(f"{len(captions)} captions but {len(images)} images")
        vis = self.image_processor(images=list(images), return_tensors="pt")
        texts = []
        for caption, thw in zip(captions, vis["image_grid_thw"], strict=True):
            text = self.tokenizer.apply_chat_template(
                calibration_messages(caption, with_image=True),
                chat_template=self.chat_template,
                tokenize=False,
            )
            n_tokens = int(thw.prod()) // self.merge_size**2
            if text.count(IMAGE_PAD) != 1:
                raise InputError(
                    f"chat template: expected exactly one {IMAGE_PAD} per image prompt, "
                    f"got {text.count(IMAGE_PAD)}"
                )
            texts.append(text.replace(IMAGE_PAD, IMAGE_PAD * n_tokens))
        return texts, vis

    def encode(
        self, captions: Sequence[str], images: Sequence[Image.Image] | None
    ) -> dict[str, torch.Tensor]:
        """Batch-encode calibration samples.

        With ``images`` (mode ``image_caption``) each sample is the chat prompt with its image;
        without (mode ``text_only``) it is the caption alone. Right padding. With images the batch
        carries ``mm_token_type_ids`` (1 on the image's tokens, 0 elsewhere), as transformers'
        ``Qwen2_5_VLProcessor`` returns it: Qwen2.5-VL derives its 3-axis rotary positions (time,
        height, width of each image token) from it, ``image_grid_thw`` and ``attention_mask``.
        Without it transformers 5.24 gives every token sequential positions, silently: the model
        would not run as deployed.
        """
        return self.encode_with_targets(captions, images)[0]

    def encode_with_targets(
        self, captions: Sequence[str], images: Sequence[Image.Image] | None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """:meth:`encode` plus a mask of the caption's own tokens, for teacher-forced evaluation.

        ``target_mask[b, t]`` is True where token ``t`` of sample ``b`` is part of the caption (the
        assistant's answer; in ``text_only`` the whole text): the positions whose prediction from
        ``t - 1`` a caption loss scores. Found from the tokenizer's character offsets, so it does
        not depend on how the prompt tokenizes.
        """
        texts, vis = self._texts(captions, images)
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, return_offsets_mapping=True)
        mask = torch.zeros_like(enc["input_ids"], dtype=torch.bool)
        for b, (text, caption) in enumerate(zip(texts, captions, strict=True)):
            start = text.rindex(ASSISTANT_TURN) + len(ASSISTANT_TURN) if vis is not None else 0
            if text[start : start + len(caption)] != caption:
                raise InputError(
                    f"chat template: the caption is not the assistant's answer in {text[-200:]!r}"
                )
            end = start + len(caption)
            offsets = enc["offset_mapping"][b]
            mask[b] = (offsets[:, 0] >= start) & (offsets[:, 1] <= end) & (offsets[:, 1] > offsets[:, 0])
            mask[b] &= enc["attention_mask"][b].bool()
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if vis is not None:
            batch.update(
                pixel_values=vis["pixel_values"],
                image_grid_thw=vis["image_grid_thw"],
                mm_token_type_ids=image_token_types(enc["input_ids"], self.image_token_id),
            )
        return batch, mask

    @property
    def image_token_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(IMAGE_PAD))

    def check_bounds(self, where: str) -> None:
        """Refuse pixel bounds that contradict each other once the snapshot's own values fill the gaps.

        With min_pixels > max_pixels the image processor silently shrinks every image to one merged
        patch; ``where`` names the params block (``model.processor``).
        """
        size = self.image_processor.size
        lo, hi = size["shortest_edge"], size["longest_edge"]
        if lo > hi:
            raise InputError(
                f"{where}.max_pixels: the image processor would resize to at least min_pixels {lo} and at "
                f"most max_pixels {hi}; set max_pixels >= {lo} (or min_pixels <= {hi})"
            )

    def save(self, out_dir: Path) -> None:
        self.tokenizer.save_pretrained(out_dir)
        self.image_processor.save_pretrained(out_dir)
        (out_dir / "chat_template.json").write_text(
            json.dumps({"chat_template": self.chat_template}, indent=2)
        )

    @classmethod
    def load(
        cls, model_dir: Path, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> ImageTextProcessor:
        """Load from a HF snapshot or from a directory written by :meth:`save` (same layout)."""
        if not (model_dir / "preprocessor_config.json").is_file():
            raise InputError(
                f"{model_dir}: preprocessor_config.json missing (expected a Qwen2.5-VL snapshot "
                "with its image processor config)"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise InputError(
                f"{model_dir}: no loadable tokenizer (tokenizer.json / tokenizer_config.json): {e}"
            ) from e
        missing = [t for t in (IMAGE_PAD, VISION_START, VISION_END) if t not in tokenizer.get_vocab()]
        if missing:
            raise InputError(f"{model_dir}: tokenizer lacks Qwen2.5-VL special tokens {missing}")
        overrides = {
            k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None
        }
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(
            model_dir, local_files_only=True, **overrides
        )
        return cls(tokenizer, image_processor, _find_chat_template(model_dir, tokenizer))


def _find_chat_template(model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> str:
    """Snapshots keep the processor's template in chat_template.json (older) or .jinja (newer)."""
    json_path, jinja_path = model_dir / "chat_template.json", model_dir / "chat_template.jinja"
    if json_path.is_file():
        template = json.loads(json_path.read_text()).get("chat_template")
        if isinstance(template, str):
            return template
    if jinja_path.is_file():
        return jinja_path.read_text()
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        return tokenizer.chat_template
    raise InputError(
        f"{model_dir}: no chat template (expected chat_template.json, chat_template.jinja or a "
        "chat_template in tokenizer_config.json)"
    )
