"""Gemma 3 (``Gemma3ForConditionalGeneration``): ``gemma3`` from weights, ``tiny_gemma3`` in code.

Each image is resized (stretched) to the SigLIP tower's square input, cut into patches, and average-pooled into a
``√mm_tokens_per_image``-sided grid of ``<image_soft_token>``s (256 for the release: 16 × 16 over 896 px), row-major.
In the prompt an image is ``\\n\\n<start_of_image>`` + its soft tokens + ``<end_of_image>\\n\\n``, as Gemma 3's
processor expands the chat template's ``<start_of_image>``. The tokens of one image attend to each other in both
directions (``token_type_ids``: 1 on soft tokens; transformers builds the mask from it) and the decoder interleaves
sliding-window layers with global ones (``layer_types``). Selection reads a global layer
(``ModelAdapter.attention_layer_indices``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, PreTrainedTokenizerFast
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from miadpo.config import ModelConfig, TinyModelConfig
from miadpo.models.base import SeparatePartsAdapter
from miadpo.models.geometry import ImageGeometry, PatchGrid
from miadpo.models.samples import EncodedSample
from miadpo.models.tiny import build_tiny_tokenizer, seeded_init, tiny_layer_types, tiny_text_config

SOFT_TOKEN, BOI, EOI = "<image_soft_token>", "<start_of_image>", "<end_of_image>"
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", BOI, EOI, SOFT_TOKEN]
GEMMA_NAMES = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
# The named tokens Gemma 3 tokenizers carry (transformers' Gemma3Processor reads them).
GEMMA_NAMED = {"image_token": SOFT_TOKEN, "boi_token": BOI, "eoi_token": EOI}
# Tiny decoder: a sliding window shorter than any prompt, and the released pattern's global layer last.
TINY_SLIDING_WINDOW = 8


class Gemma3Adapter(SeparatePartsAdapter):
    """Adapter for Gemma3ForConditionalGeneration."""

    image_token = SOFT_TOKEN
    model_class = Gemma3ForConditionalGeneration
    image_processor_class = Gemma3ImageProcessorPil

    @classmethod
    def build_tiny(cls, cfg: ModelConfig) -> tuple[nn.Module, PreTrainedTokenizerFast, Gemma3ImageProcessorPil]:
        """(model, tokenizer, image processor) of ``tiny_gemma3``: Gemma's special tokens, a square
        ``tiny.image_size``-px input."""
        tiny = cfg.tiny
        tokenizer = build_tiny_tokenizer(tiny.vocab_size, GEMMA_SPECIALS, GEMMA_NAMES, extra=GEMMA_NAMED)
        image_processor = Gemma3ImageProcessorPil(size={"height": tiny.image_size, "width": tiny.image_size})
        return cls.tiny_model(tiny, tokenizer, cfg.attn_implementation), tokenizer, image_processor

    @classmethod
    def tiny_model(cls, tiny: TinyModelConfig, tokenizer: PreTrainedTokenizerFast, attn: str) -> nn.Module:
        """``tiny.num_layers`` decoder layers, every 4th global, the others sliding over ``TINY_SLIDING_WINDOW``
        tokens; a SigLIP tower whose patch grid is pooled 2 × 2."""
        ids = tokenizer.convert_tokens_to_ids
        head_dim = tiny.hidden_size // tiny.num_heads
        config = Gemma3Config(
            text_config=tiny_text_config(tiny, tokenizer, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                                         layer_types=tiny_layer_types(tiny.num_layers, "sliding_attention"),
                                         sliding_window=TINY_SLIDING_WINDOW),
            vision_config={"hidden_size": tiny.vision_hidden_size, "intermediate_size": 2 * tiny.vision_hidden_size,
                           "num_hidden_layers": tiny.vision_layers, "num_attention_heads": 2,
                           "image_size": tiny.image_size, "patch_size": tiny.patch_size},
            mm_tokens_per_image=(tiny.image_size // tiny.patch_size // 2) ** 2,
            boi_token_index=ids(BOI), eoi_token_index=ids(EOI), image_token_index=ids(SOFT_TOKEN),
        )
        config._attn_implementation = attn
        model = seeded_init(cls.model_class, config, tiny.init_seed)
        # transformers starts the projector's input projection at zero (images invisible until trained): random here,
        # unit-variance outputs, so the tiny model's answers depend on its images.
        projection = model.model.multi_modal_projector.mm_input_projection_weight
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(tiny.init_seed + 1)
            projection.normal_(std=tiny.vision_hidden_size**-0.5)
        return model

    def image_geometry(self, image_size: tuple[int, int]) -> ImageGeometry:
        """One ``√mm_tokens_per_image``-sided grid over the whole image (stretched to the square input)."""
        side = math.isqrt(self.base_model.config.mm_tokens_per_image)
        width, height = image_size
        grid = PatchGrid(rows=side, cols=side, token_offset=0, scale_x=side / width, scale_y=side / height,
                         offset_x=0.0, offset_y=0.0)
        return ImageGeometry(image_size=image_size, num_tokens=side * side, grids=(grid,))

    @property
    def chat_image_marker(self) -> str:
        """``<start_of_image>``, which Gemma 3's processor expands into the image's tokens."""
        return BOI  # what Gemma 3's chat template writes for an image; its processor expands it

    def image_placeholder(self, geometry: ImageGeometry) -> str:
        """``\\n\\n<start_of_image>`` + the image's soft tokens + ``<end_of_image>\\n\\n``."""
        return f"\n\n{BOI}" + SOFT_TOKEN * geometry.num_tokens + f"{EOI}\n\n"

    def pixel_inputs(self, images: list[Image.Image], geometries: list[ImageGeometry]
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Pixel values, one view per image (no pan-and-scan crops), and no extra inputs."""
        out = self.image_processor(images=images, do_pan_and_scan=False, return_tensors="pt")
        if out["pixel_values"].shape[0] != len(images):
            raise RuntimeError(f"image processor made {out['pixel_values'].shape[0]} views of {len(images)} images")
        return out["pixel_values"], {}

    def collate(self, samples: Sequence[EncodedSample], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """``token_type_ids`` 1 on image soft tokens: transformers lets each image's tokens see one another."""
        batch = super().collate(samples, padding_side)
        batch["token_type_ids"] = (batch["input_ids"] == self.image_token_id).long()
        return batch
