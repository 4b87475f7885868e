"""Gemma 4 (``Gemma4ForConditionalGeneration``): ``gemma4`` from weights, ``tiny_gemma4`` in code.

Each image keeps its aspect ratio: it is resized so that its patch grid, pooled ``k × k`` (``pooling_kernel_size``),
gives at most ``max_soft_tokens`` soft tokens — a budget the image processor takes only from 70, 140, 280, 560 and
1120 (the releases use 280) — and each pooled cell becomes one ``<|image|>`` token, row-major. In the prompt an
image is ``<|image>`` + its soft tokens + ``<image|>``, as Gemma 4's processor expands the chat template's
``<|image|>``; ``image_position_ids`` carry each patch's (x, y) to the vision tower's 2-D positions.

The decoder interleaves sliding-window layers with global ones (``layer_types``; selection reads a global layer).
With ``use_bidirectional_attention="vision"`` (the 26B / 31B releases) an image's tokens see each other in both
directions, marked by ``mm_token_type_ids``; the E2B / E4B releases add per-layer input embeddings and let their
last layers reuse earlier layers' keys and values (``num_kv_shared_layers``). The tiny model has all three.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn
from transformers import Gemma4Config, Gemma4ForConditionalGeneration, PreTrainedTokenizerFast
from transformers.models.gemma4.image_processing_pil_gemma4 import (
    Gemma4ImageProcessorPil,
    get_aspect_ratio_preserving_size,
)

from miadpo.config import ModelConfig, TinyModelConfig
from miadpo.models.base import SeparatePartsAdapter
from miadpo.models.geometry import ImageGeometry, PatchGrid
from miadpo.models.samples import EncodedSample
from miadpo.models.tiny import build_tiny_tokenizer, seeded_init, tiny_text_config

SOFT_TOKEN, BOI, EOI = "<|image|>", "<|image>", "<image|>"
AUDIO, BOA, EOA, VIDEO = "<|audio|>", "<|audio>", "<audio|>", "<|video|>"
TURN, END_TURN = "<|turn>", "<turn|>"
GEMMA4_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", TURN, END_TURN, BOI, EOI, SOFT_TOKEN, BOA, EOA, AUDIO, VIDEO]
GEMMA4_NAMES = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
# The named tokens Gemma 4 tokenizers carry; its processor reads the image ones and checks the audio ones.
GEMMA4_NAMED = {"image_token": SOFT_TOKEN, "boi_token": BOI, "eoi_token": EOI, "audio_token": AUDIO,
                "boa_token": BOA, "eoa_token": EOA, "sot_token": TURN, "eot_token": END_TURN}
# Tiny sizes: the smallest soft-token budget the processor allows (70), pooled 3 × 3 as the releases; a sliding
# window shorter than any prompt; the last two layers reusing the keys and values of the first two.
TINY_SOFT_TOKENS, TINY_POOLING, TINY_SLIDING_WINDOW = 70, 3, 8


class Gemma4Adapter(SeparatePartsAdapter):
    """Adapter for Gemma4ForConditionalGeneration (images and text; the audio tower, where a release has one, idles)."""

    image_token = SOFT_TOKEN
    model_class = Gemma4ForConditionalGeneration
    image_processor_class = Gemma4ImageProcessorPil
    module_paths = {"vision_tower": "model.vision_tower", "projector": "model.embed_vision",
                    "llm": "model.language_model"}
    image_feature_inputs = ("pixel_values", "image_position_ids")

    @classmethod
    def build_tiny(cls, cfg: ModelConfig) -> tuple[nn.Module, PreTrainedTokenizerFast, Gemma4ImageProcessorPil]:
        """(model, tokenizer, image processor) of ``tiny_gemma4``: Gemma 4's special tokens, ``TINY_SOFT_TOKENS`` soft
        tokens at most per image, pooled ``TINY_POOLING`` × ``TINY_POOLING``."""
        tiny = cfg.tiny
        tokenizer = build_tiny_tokenizer(tiny.vocab_size, GEMMA4_SPECIALS, GEMMA4_NAMES, extra=GEMMA4_NAMED)
        image_processor = Gemma4ImageProcessorPil(max_soft_tokens=TINY_SOFT_TOKENS, patch_size=tiny.patch_size,
                                                  pooling_kernel_size=TINY_POOLING)
        return cls.tiny_model(tiny, tokenizer, cfg.attn_implementation), tokenizer, image_processor

    @classmethod
    def tiny_model(cls, tiny: TinyModelConfig, tokenizer: PreTrainedTokenizerFast, attn: str) -> nn.Module:
        """``tiny.num_layers`` decoder layers alternating sliding-window and global attention, the second half
        sharing the first half's keys and values; 8-wide per-layer inputs; bidirectional attention inside images."""
        ids = tokenizer.convert_tokens_to_ids
        head_dim = tiny.hidden_size // tiny.num_heads
        layer_types = ["full_attention" if i % 2 else "sliding_attention" for i in range(tiny.num_layers)]
        text = tiny_text_config(tiny, tokenizer, head_dim=head_dim, global_head_dim=head_dim, layer_types=layer_types,
                                sliding_window=TINY_SLIDING_WINDOW, hidden_size_per_layer_input=8,
                                vocab_size_per_layer_input=len(tokenizer), num_kv_shared_layers=tiny.num_layers // 2,
                                final_logit_softcapping=30.0, use_bidirectional_attention="vision")
        vision = {"hidden_size": tiny.vision_hidden_size, "intermediate_size": 2 * tiny.vision_hidden_size,
                  "num_hidden_layers": tiny.vision_layers, "num_attention_heads": 2, "num_key_value_heads": 2,
                  "head_dim": tiny.vision_hidden_size // 2, "patch_size": tiny.patch_size,
                  "pooling_kernel_size": TINY_POOLING,
                  # one learned position per patch index along a side: a 1-row image is budget × k patches long
                  "position_embedding_size": TINY_SOFT_TOKENS * TINY_POOLING}
        config = Gemma4Config(text_config=text, vision_config=vision, audio_config=None,
                              image_token_id=ids(SOFT_TOKEN), boi_token_id=ids(BOI), eoi_token_id=ids(EOI),
                              video_token_id=ids(VIDEO), audio_token_id=ids(AUDIO), boa_token_id=ids(BOA),
                              eoa_token_index=ids(EOA))
        config._attn_implementation = attn
        return seeded_init(cls.model_class, config, tiny.init_seed)

    def image_geometry(self, image_size: tuple[int, int]) -> ImageGeometry:
        """One grid of pooled cells over the image resized with its aspect ratio kept, within the soft-token budget."""
        processor = self.image_processor
        width, height = image_size
        k, patch = processor.pooling_kernel_size, processor.patch_size
        new_h, new_w = get_aspect_ratio_preserving_size(height, width, patch, processor.max_soft_tokens * k * k, k)
        rows, cols = new_h // (patch * k), new_w // (patch * k)
        grid = PatchGrid(rows=rows, cols=cols, token_offset=0, scale_x=cols / width, scale_y=rows / height,
                         offset_x=0.0, offset_y=0.0)
        return ImageGeometry(image_size=image_size, num_tokens=rows * cols, grids=(grid,))

    def image_placeholder(self, geometry: ImageGeometry) -> str:
        """``<|image>`` + the image's soft tokens + ``<image|>``."""
        return BOI + SOFT_TOKEN * geometry.num_tokens + EOI

    def pixel_inputs(self, images: list[Image.Image], geometries: list[ImageGeometry]
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Pixel values and ``image_position_ids``; fails when a soft-token count disagrees with the geometry."""
        out = self.image_processor(images=images, return_tensors="pt")
        for geometry, count in zip(geometries, out["num_soft_tokens_per_image"]):
            if int(count) != geometry.num_tokens:
                raise RuntimeError(f"image processor made {int(count)} soft tokens, the geometry says "
                                   f"{geometry.num_tokens}")
        return out["pixel_values"], {"image_position_ids": out["image_position_ids"]}

    @staticmethod
    def with_image_features(inputs: dict[str, torch.Tensor], features: object | None) -> dict[str, object]:
        """As the base, without ``image_position_ids`` either: only the vision tower reads them."""
        rest = SeparatePartsAdapter.with_image_features(inputs, features)
        if features is not None:
            rest.pop("image_position_ids", None)
        return rest

    def collate(self, samples: Sequence[EncodedSample], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """``mm_token_type_ids`` 1 on image soft tokens: transformers lets each image's tokens see one another."""
        batch = super().collate(samples, padding_side)
        batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id).long()
        return batch
