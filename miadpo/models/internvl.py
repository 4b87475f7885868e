"""InternVL (transformers-native ``InternVLForConditionalGeneration``): ``internvl`` from weights, ``tiny_internvl``.

Each image is cut into ``cols × rows`` tiles of the vision tower's size, the grid whose aspect ratio is closest
to the image's within ``[min_patches, max_patches]`` tiles (row-major), plus a thumbnail of the whole image when
there is more than one tile. Every tile gives ``image_seq_length`` tokens: its patch features pixel-shuffled by
``downsample_ratio`` into a row-major grid. In the prompt an image is ``<img>`` + its tokens + ``</img>``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from PIL import Image
from torch import nn
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    PreTrainedTokenizerFast,
)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
    GotOcr2ImageProcessorPil,
    get_optimal_tiled_canvas,
)

from miadpo.config import ModelConfig, TinyModelConfig
from miadpo.models.base import SeparatePartsAdapter
from miadpo.models.geometry import ImageGeometry, PatchGrid
from miadpo.models.qwen2_vl import CHATML_NAMES, CHATML_SPECIALS
from miadpo.models.tiny import build_tiny_tokenizer, seeded_init, tiny_text_config

INTERNVL_SPECIALS = CHATML_SPECIALS + ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
# The named tokens InternVL-hf tokenizers carry (transformers' InternVLProcessor reads them).
INTERNVL_NAMED = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                  "video_token": "<video>"}


class InternVLAdapter(SeparatePartsAdapter):
    """Adapter for InternVLForConditionalGeneration (InternVL 2.5 / 3 in the transformers layout)."""

    image_token = "<IMG_CONTEXT>"

    model_class = InternVLForConditionalGeneration
    image_processor_class = GotOcr2ImageProcessorPil
    # The language model of the tiny variant (InternVL3: Qwen2.5's architecture).
    text_model_type: ClassVar[str] = "qwen2"

    @classmethod
    def build_tiny(cls, cfg: ModelConfig) -> tuple[nn.Module, PreTrainedTokenizerFast, GotOcr2ImageProcessorPil]:
        """(model, tokenizer, image processor) of ``tiny_internvl``: ``tiny.image_size``-px tiles, ``tiny.max_tiles`` at
        most."""
        tiny = cfg.tiny
        tokenizer = build_tiny_tokenizer(tiny.vocab_size, INTERNVL_SPECIALS, CHATML_NAMES, extra=INTERNVL_NAMED)
        image_processor = GotOcr2ImageProcessorPil(
            size={"height": tiny.image_size, "width": tiny.image_size}, crop_to_patches=True, min_patches=1,
            max_patches=tiny.max_tiles)
        model = tiny_internvl(tiny, tokenizer, cfg.attn_implementation, cls.text_model_type)
        return model, tokenizer, image_processor

    @property
    def _tile(self) -> int:
        return self.image_processor.size["height"]

    @property
    def _tile_cells(self) -> int:
        """Token rows (= columns) of one tile after pixel shuffle."""
        config = self.base_model.config
        patch = config.vision_config.patch_size
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        return int(self._tile // patch * config.downsample_ratio)

    def image_geometry(self, image_size: tuple[int, int]) -> ImageGeometry:
        """One grid per tile (row-major), then the thumbnail's when there is more than one tile."""
        width, height = image_size
        processor, tile, cells = self.image_processor, self._tile, self._tile_cells
        cols, rows = 1, 1
        if processor.crop_to_patches and processor.max_patches > 1:
            cols, rows = get_optimal_tiled_canvas((height, width), (tile, tile), processor.min_patches,
                                                  processor.max_patches)
        per_tile = cells * cells
        scale_x, scale_y = cols * cells / width, rows * cells / height  # cells per original pixel
        grids = [PatchGrid(rows=cells, cols=cells, token_offset=k * per_tile, scale_x=scale_x, scale_y=scale_y,
                           offset_x=-(k % cols) * cells, offset_y=-(k // cols) * cells)
                 for k in range(cols * rows)]
        if cols * rows > 1:  # the thumbnail: the whole image squeezed into one tile
            grids.append(PatchGrid(rows=cells, cols=cells, token_offset=len(grids) * per_tile,
                                   scale_x=cells / width, scale_y=cells / height, offset_x=0.0, offset_y=0.0))
        return ImageGeometry(image_size=image_size, num_tokens=len(grids) * per_tile, grids=tuple(grids),
                             layout=(cols, rows))

    def image_placeholder(self, geometry: ImageGeometry) -> str:
        """``<img>`` + the image's ``<IMG_CONTEXT>`` tokens + ``</img>``."""
        return "<img>" + self.image_token * geometry.num_tokens + "</img>"

    def pixel_inputs(self, images: list[Image.Image], geometries: list[ImageGeometry]
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Pixel values of all tiles, no extra inputs; fails when a tile count disagrees with the geometry."""
        out = self.image_processor(images=images, crop_to_patches=self.image_processor.crop_to_patches,
                                   return_tensors="pt")
        for geometry, tiles in zip(geometries, out["num_patches"]):
            if len(geometry.grids) != int(tiles):
                raise RuntimeError(f"image processor made {int(tiles)} tiles; the geometry has {len(geometry.grids)}")
        return out["pixel_values"], {}



class InternVL35Adapter(InternVLAdapter):
    """InternVL3.5 (``-HF`` checkpoints): InternVL3's vision side and tiling on a Qwen3 language model (per-head
    RMSNorm on queries and keys, no attention bias)."""

    text_model_type = "qwen3"


def tiny_internvl(tiny: TinyModelConfig, tokenizer: PreTrainedTokenizerFast, attn: str,
                  text_model_type: str = "qwen2") -> nn.Module:
    """A tiny InternVL with random weights: a ``text_model_type`` decoder, a small vision tower,
    ``downsample_ratio`` 0.5."""
    config = InternVLConfig(
        text_config={"model_type": text_model_type, "head_dim": tiny.hidden_size // tiny.num_heads,
                     **tiny_text_config(tiny, tokenizer)},
        vision_config={"hidden_size": tiny.vision_hidden_size, "intermediate_size": 2 * tiny.vision_hidden_size,
                       "num_hidden_layers": tiny.vision_layers, "num_attention_heads": 2,
                       "image_size": [tiny.image_size, tiny.image_size],
                       "patch_size": [tiny.patch_size, tiny.patch_size]},
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=(tiny.image_size // tiny.patch_size) ** 2 // 4,
        downsample_ratio=0.5,
    )
    config._attn_implementation = attn
    return seeded_init(InternVLForConditionalGeneration, config, tiny.init_seed)
