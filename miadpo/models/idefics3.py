"""Idefics3 and SmolVLM (image splitting): ``idefics3`` / ``smolvlm`` from weights, ``tiny_*`` built in code.

An image is resized so its longest edge is ``size.longest_edge``, then up to multiples of the tile size
``max_image_size.longest_edge`` and split into ``rows × cols`` tiles (row-major), followed by a global view of
the whole image; a small image is only the global view. Every tile's patch features are pixel-shuffled by
``scale_factor`` into ``image_seq_len`` tokens (a row-major grid). In the prompt each tile is
``<fake_token_around_image><row_r_col_c>`` + its ``<image>`` tokens, rows end with a newline, and the global view is
``\\n<fake_token_around_image><global-img>`` + tokens + ``<fake_token_around_image>``. The span of an image runs from
its first to its last ``<image>`` token, tile tags included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    PreTrainedTokenizerFast,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)
from transformers.models.idefics3 import image_processing_pil_idefics3 as idefics3_images
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from miadpo.config import ModelConfig, TinyModelConfig
from miadpo.models.base import SeparatePartsAdapter
from miadpo.models.geometry import ImageGeometry, PatchGrid
from miadpo.models.samples import EncodedSample
from miadpo.models.tiny import build_tiny_tokenizer, seeded_init, tiny_text_config

FAKE, GLOBAL = "<fake_token_around_image>", "<global-img>"
TILE_TAGS = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
IDEFICS3_SPECIALS = ["<pad>", "<unk>", "<|begin_of_text|>", "<end_of_utterance>", FAKE, "<image>", GLOBAL, *TILE_TAGS]
IDEFICS3_NAMES = {"bos_token": "<|begin_of_text|>", "eos_token": "<end_of_utterance>", "pad_token": "<pad>",
                  "unk_token": "<unk>"}


def split_size(image_size: tuple[int, int], longest_edge: int, tile: int) -> tuple[int, int]:
    """(width, height) the image is resized to before splitting: longest edge, then multiples of ``tile``."""
    width, height = image_size
    height, width = idefics3_images._resize_output_size_rescale_to_max_len(height, width, max_len=longest_edge)
    height, width = idefics3_images._resize_output_size_scale_below_upper_bound(
        height, width, max_len=idefics3_images.MAX_IMAGE_SIZE)
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return width, height


class Idefics3Adapter(SeparatePartsAdapter):
    """Adapter for Idefics3ForConditionalGeneration (and, via :class:`SmolVLMAdapter`, SmolVLM)."""

    image_token = "<image>"
    model_class = Idefics3ForConditionalGeneration
    config_class: type = Idefics3Config
    image_processor_class = Idefics3ImageProcessorPil
    module_paths = {"vision_tower": "model.vision_model", "projector": "model.connector", "llm": "model.text_model"}
    image_feature_inputs = ("pixel_values", "pixel_attention_mask")

    @classmethod
    def build_tiny(cls, cfg: ModelConfig) -> tuple[nn.Module, PreTrainedTokenizerFast, Any]:
        """(model, tokenizer, image processor) of the tiny variant: ``tiny.image_size``-px tiles, images resized to a
        longest edge of twice that, splitting on."""
        tiny = cfg.tiny
        tokenizer = build_tiny_tokenizer(tiny.vocab_size, IDEFICS3_SPECIALS, IDEFICS3_NAMES, extra={})
        image_processor = cls.image_processor_class(
            size={"longest_edge": 2 * tiny.image_size}, max_image_size={"longest_edge": tiny.image_size},
            do_image_splitting=True)
        return cls.tiny_model(tiny, tokenizer, cfg.attn_implementation), tokenizer, image_processor

    @classmethod
    def tiny_model(cls, tiny: TinyModelConfig, tokenizer: PreTrainedTokenizerFast, attn: str) -> nn.Module:
        """``config_class`` with a Llama decoder, a small vision tower and pixel shuffle by 2; random weights."""
        config = cls.config_class(
            text_config={"model_type": "llama", **tiny_text_config(tiny, tokenizer)},
            vision_config={"hidden_size": tiny.vision_hidden_size, "intermediate_size": 2 * tiny.vision_hidden_size,
                           "num_hidden_layers": tiny.vision_layers, "num_attention_heads": 2,
                           "image_size": tiny.image_size, "patch_size": tiny.patch_size},
            scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            pad_token_id=tokenizer.pad_token_id,
        )
        config._attn_implementation = attn
        return seeded_init(cls.model_class, config, tiny.init_seed)

    @property
    def _tile(self) -> int:
        return self.image_processor.max_image_size["longest_edge"]

    @property
    def _tile_cells(self) -> int:
        config = self.base_model.config
        return config.vision_config.image_size // config.vision_config.patch_size // config.scale_factor

    def _tiles(self, image_size: tuple[int, int]) -> tuple[int, int, tuple[int, int]]:
        """(rows, cols, resized (width, height)); rows = cols = 0 when the image is only its global view."""
        tile = self._tile
        if not self.image_processor.do_image_splitting:
            return 0, 0, (tile, tile)
        width, height = split_size(image_size, self.image_processor.size["longest_edge"], tile)
        if width > tile or height > tile:
            return height // tile, width // tile, (width, height)
        return 0, 0, (tile, tile)

    def image_geometry(self, image_size: tuple[int, int]) -> ImageGeometry:
        """One grid per tile (row-major), then the global view's; the span includes the tile tags."""
        rows, cols, _ = self._tiles(image_size)
        width, height = image_size
        cells = self._tile_cells
        offsets, span = self._layout(rows, cols)
        grids = [PatchGrid(rows=cells, cols=cells, token_offset=offsets[k], scale_x=cols * cells / width,
                           scale_y=rows * cells / height, offset_x=-(k % cols) * cells, offset_y=-(k // cols) * cells)
                 for k in range(rows * cols)]
        grids.append(PatchGrid(rows=cells, cols=cells, token_offset=offsets[-1], scale_x=cells / width,
                               scale_y=cells / height, offset_x=0.0, offset_y=0.0))
        return ImageGeometry(image_size=image_size, num_tokens=span, grids=tuple(grids),
                             image_tokens=len(grids) * cells * cells, layout=(rows, cols))

    def _layout(self, rows: int, cols: int) -> tuple[list[int], int]:
        cache: dict[tuple[int, int], tuple[list[int], int]] = self.__dict__.setdefault("_layouts", {})
        if (rows, cols) not in cache:
            cache[rows, cols] = tile_offsets(self.tokenizer, self.image_token_id, self._placeholder(rows, cols))
        return cache[rows, cols]

    def _placeholder(self, rows: int, cols: int) -> str:
        tokens = self.image_token * self._tile_cells ** 2
        text = "".join("".join(f"{FAKE}<row_{r + 1}_col_{c + 1}>{tokens}" for c in range(cols)) + "\n"
                       for r in range(rows))
        return text + ("\n" if rows else "") + f"{FAKE}{GLOBAL}{tokens}{FAKE}"

    def image_placeholder(self, geometry: ImageGeometry) -> str:
        """Each tile's tags and ``<image>`` tokens row by row, then the global view's (``geometry.layout`` gives the
        rows and cols)."""
        return self._placeholder(*geometry.layout)

    def pixel_inputs(self, images: list[Image.Image], geometries: list[ImageGeometry]
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Tiles and ``pixel_attention_mask``; fails when the processor's split disagrees with the geometry."""
        out = self.image_processor(images=[images], return_row_col_info=True, return_tensors="pt")
        for geometry, rows, cols in zip(geometries, out["rows"][0], out["cols"][0]):
            if geometry.layout != (rows, cols):
                raise RuntimeError(f"image processor split {rows}×{cols}; the geometry says {geometry.layout}")
        return out["pixel_values"], {"pixel_attention_mask": out["pixel_attention_mask"]}

    def collate_images(self, samples: Sequence[EncodedSample]) -> dict[str, torch.Tensor]:
        """Per-sample tiles padded to the batch's most tiles with all-zero images (the model drops them)."""
        with_images = [s for s in samples if s.pixel_values is not None]
        if not with_images:
            return {}
        reference = with_images[0]
        no_tiles, no_masks = reference.pixel_values[0, :0], reference.extra["pixel_attention_mask"][0, :0]
        pixels = [no_tiles if s.pixel_values is None else s.pixel_values[0] for s in samples]
        masks = [no_masks if s.pixel_values is None else s.extra["pixel_attention_mask"][0] for s in samples]
        return {"pixel_values": pad_sequence(pixels, batch_first=True),
                "pixel_attention_mask": pad_sequence(masks, batch_first=True).long()}



class SmolVLMAdapter(Idefics3Adapter):
    """SmolVLM: Idefics3's token layout with its own image processor and model class."""

    model_class = SmolVLMForConditionalGeneration
    config_class = SmolVLMConfig
    image_processor_class = SmolVLMImageProcessorPil


def tile_offsets(tokenizer: Any, image_token_id: int, text: str) -> tuple[list[int], int]:
    """Offsets of each tile's token run from the image's first ``<image>`` token, and the span length.

    The placeholder starts and ends with special tokens, so its tokenization does not depend on the text around it.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    positions = [i for i, t in enumerate(ids) if t == image_token_id]
    first = positions[0]
    starts = [p - first for k, p in enumerate(positions) if k == 0 or positions[k - 1] != p - 1]
    return starts, positions[-1] - first + 1
