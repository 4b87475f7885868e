"""Qwen2-VL and Qwen2.5-VL (dynamic resolution): ``qwen2_vl`` / ``qwen2_5_vl`` from weights, ``tiny_*`` in code.

Each image is resized by ``smart_resize`` to multiples of ``patch × merge`` pixels within
``[min_pixels, max_pixels]``, cut into 14-px patches, and every ``merge × merge`` block of patches becomes one
``<|image_pad|>`` token, row-major over the merged grid (``image_grid_thw`` carries the grid). In the prompt an
image is ``<|vision_start|>`` + its pad tokens + ``<|vision_end|>``. mRoPE position ids are computed by the model
from ``mm_token_type_ids`` (1 on image tokens) and the attention mask, so left or right padding and a cut answer
keep them right.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

from miadpo.config import ModelConfig, TinyModelConfig
from miadpo.models.base import SeparatePartsAdapter
from miadpo.models.geometry import ImageGeometry, PatchGrid
from miadpo.models.samples import EncodedSample
from miadpo.models.tiny import build_tiny_tokenizer, seeded_init, tiny_text_config

CHATML_SPECIALS = ["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>"]
QWEN_SPECIALS = CHATML_SPECIALS + ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHATML_NAMES = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"}


class QwenVLAdapter(SeparatePartsAdapter):
    """Adapter for Qwen2VLForConditionalGeneration (and, via :class:`Qwen25VLAdapter`, Qwen2.5-VL)."""

    image_token = "<|image_pad|>"
    model_class = Qwen2VLForConditionalGeneration
    image_processor_class = Qwen2VLImageProcessorPil
    # The patch merger (the projector) lives inside the vision tower: freezing applies the groups in this order,
    # so the projector's switch decides for the merger.
    module_paths = {"vision_tower": "model.visual", "projector": "model.visual.merger", "llm": "model.language_model"}
    image_feature_inputs = ("pixel_values", "image_grid_thw")
    # The tiny tokenizer's pre-tokenizer regex (None: byte-level BPE with a prefix space, build_tiny_tokenizer's own).
    tiny_split_regex: ClassVar[str | None] = None

    @classmethod
    def tiny_model(cls, tiny: TinyModelConfig, tokenizer: PreTrainedTokenizerFast, attn: str) -> nn.Module:
        """A tiny Qwen2-VL with random weights: mRoPE decoder, 2 × 2 merge, two-frame temporal patches."""
        config = Qwen2VLConfig(
            text_config=qwen_text_config(tiny, tokenizer),
            vision_config={"depth": tiny.vision_layers, "embed_dim": tiny.vision_hidden_size,
                           "hidden_size": tiny.hidden_size, "num_heads": 2, "mlp_ratio": 2,
                           "patch_size": tiny.patch_size, "spatial_merge_size": 2, "temporal_patch_size": 2},
            **cls.vision_token_ids(tokenizer),
        )
        config._attn_implementation = attn
        return seeded_init(cls.model_class, config, tiny.init_seed)

    @staticmethod
    def vision_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
        """The config's image, video and vision start/end token ids, read off ``tokenizer``."""
        ids = tokenizer.convert_tokens_to_ids
        return {"image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
                "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>")}

    @classmethod
    def tiny_tokenizer(cls, tiny: TinyModelConfig) -> PreTrainedTokenizerFast:
        """The tiny BPE tokenizer with Qwen's special tokens, pre-tokenized by ``tiny_split_regex``."""
        return build_tiny_tokenizer(tiny.vocab_size, QWEN_SPECIALS, CHATML_NAMES,
                                    extra={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
                                    split_regex=cls.tiny_split_regex)

    @classmethod
    def build_tiny(cls, cfg: ModelConfig) -> tuple[nn.Module, PreTrainedTokenizerFast, Qwen2VLImageProcessorPil]:
        """(model, tokenizer, image processor) of the tiny variant: 2 × 2 merge, at most ``tiny.max_tiles`` ×
        ``tiny.image_size``² pixels."""
        tiny = cfg.tiny
        tokenizer = cls.tiny_tokenizer(tiny)
        merge = 2 * tiny.patch_size
        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=merge * merge, max_pixels=tiny.image_size * tiny.image_size * tiny.max_tiles,
            patch_size=tiny.patch_size, merge_size=2, temporal_patch_size=2)
        return cls.tiny_model(tiny, tokenizer, cfg.attn_implementation), tokenizer, image_processor

    def _resized(self, image_size: tuple[int, int]) -> tuple[int, int]:
        processor = self.image_processor
        factor = processor.patch_size * processor.merge_size
        width, height = image_size
        new_h, new_w = smart_resize(height, width, factor=factor, min_pixels=processor.size["shortest_edge"],
                                    max_pixels=processor.size["longest_edge"])
        return new_w, new_h

    def image_geometry(self, image_size: tuple[int, int]) -> ImageGeometry:
        """One grid of merged patch blocks over the image as ``smart_resize`` resizes it."""
        new_w, new_h = self._resized(image_size)
        cell = self.image_processor.patch_size * self.image_processor.merge_size  # pixels per token
        grid = PatchGrid(rows=new_h // cell, cols=new_w // cell, token_offset=0,
                         scale_x=new_w / image_size[0] / cell, scale_y=new_h / image_size[1] / cell,
                         offset_x=0.0, offset_y=0.0)
        return ImageGeometry(image_size=image_size, num_tokens=grid.rows * grid.cols, grids=(grid,))

    @property
    def chat_image_marker(self) -> str:
        """``<|vision_start|><|image_pad|><|vision_end|>``, as Qwen2-VL's own template writes an image."""
        return "<|vision_start|>" + self.image_token + "<|vision_end|>"  # as Qwen2-VL's own template writes it

    def image_placeholder(self, geometry: ImageGeometry) -> str:
        """``<|vision_start|>`` + the image's ``<|image_pad|>`` tokens + ``<|vision_end|>``."""
        return "<|vision_start|>" + self.image_token * geometry.num_tokens + "<|vision_end|>"

    def pixel_inputs(self, images: list[Image.Image], geometries: list[ImageGeometry]
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Pixel values and ``image_grid_thw``; fails when a grid disagrees with the geometry."""
        out = self.image_processor(images=images, return_tensors="pt")
        merge = self.image_processor.merge_size
        for geometry, thw in zip(geometries, out["image_grid_thw"].tolist()):
            if geometry.num_tokens != thw[1] * thw[2] // merge**2:
                raise RuntimeError(f"image grid {thw} disagrees with the computed geometry {geometry.grids[0]}")
        return out["pixel_values"], {"image_grid_thw": out["image_grid_thw"]}

    def collate(self, samples: Sequence[EncodedSample], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """``mm_token_type_ids`` 1 on image tokens: the model computes mRoPE positions from it."""
        batch = super().collate(samples, padding_side)
        batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id).to(torch.int32)
        return batch

    def prompt_position_ids(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """mRoPE positions (3, B, L) from the model's own rule (image tokens on a 2-D grid, text on a line)."""
        positions, _ = self.base_model.model.get_rope_index(
            batch["input_ids"], batch["mm_token_type_ids"], image_grid_thw=batch.get("image_grid_thw"),
            attention_mask=batch["attention_mask"])
        return positions



class Qwen25VLAdapter(QwenVLAdapter):
    """Qwen2.5-VL: the same token layout; a windowed-attention vision tower with an RMSNorm merger."""

    model_class = Qwen2_5_VLForConditionalGeneration

    @classmethod
    def tiny_model(cls, tiny: TinyModelConfig, tokenizer: PreTrainedTokenizerFast, attn: str) -> nn.Module:
        """A tiny Qwen2.5-VL with random weights: windowed vision attention, the last vision layer full attention."""
        config = Qwen2_5_VLConfig(
            text_config=qwen_text_config(tiny, tokenizer),
            vision_config={"depth": tiny.vision_layers, "hidden_size": tiny.vision_hidden_size,
                           "intermediate_size": 2 * tiny.vision_hidden_size, "num_heads": 2,
                           "out_hidden_size": tiny.hidden_size, "patch_size": tiny.patch_size,
                           "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 4 * tiny.patch_size,
                           "fullatt_block_indexes": [tiny.vision_layers - 1]},
            **cls.vision_token_ids(tokenizer),
        )
        config._attn_implementation = attn
        return seeded_init(cls.model_class, config, tiny.init_seed)


def qwen_text_config(tiny: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    """Tiny decoder config with an mRoPE split (temporal, height, width) that sums to half the head size."""
    half = tiny.hidden_size // tiny.num_heads // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    return tiny_text_config(tiny, tokenizer,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section})
