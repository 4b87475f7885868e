"""LLaVA-OneVision (anyres): ``llava_onevision`` from weights, ``tiny_llava_onevision`` built in code.

A prompt with one image uses anyres: a base view (the image squeezed to the tower's size, ``g × g`` tokens) then
the high-resolution grid — the image fitted into the best ``image_grid_pinpoints`` canvas, its padding cut away
(and the grid downscaled when it exceeds ``anyres_max_N`` base views), one newline token closing each row.
A prompt with several images gives each one only its base view of the image padded to square, plus one newline
token. The model tells the two cases apart by ``batch_num_images``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedTokenizerFast,
)
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from miadpo.config import ModelConfig, TinyModelConfig
from miadpo.models.base import ModelAdapter, SeparatePartsAdapter
from miadpo.models.geometry import ImageGeometry, PatchGrid, square_padding
from miadpo.models.qwen2_vl import CHATML_NAMES, CHATML_SPECIALS
from miadpo.models.samples import EncodedSample
from miadpo.models.tiny import build_tiny_tokenizer, seeded_init, tiny_text_config

ONEVISION_SPECIALS = CHATML_SPECIALS + ["<image>", "<video>"]


class LlavaOnevisionAdapter(SeparatePartsAdapter):
    """Adapter for LlavaOnevisionForConditionalGeneration."""

    image_token = "<image>"

    model_class = LlavaOnevisionForConditionalGeneration
    image_processor_class = LlavaOnevisionImageProcessorPil
    image_feature_inputs = ("pixel_values", "image_sizes", "batch_num_images")

    @classmethod
    def build_tiny(cls, cfg: ModelConfig) -> tuple[nn.Module, PreTrainedTokenizerFast, LlavaOnevisionImageProcessorPil]:
        """(model, tokenizer, image processor) of ``tiny_llava_onevision``: anyres canvases of up to 2 × 2 tower-sized
        tiles."""
        tiny = cfg.tiny
        tokenizer = build_tiny_tokenizer(tiny.vocab_size, ONEVISION_SPECIALS, CHATML_NAMES,
                                         extra={"image_token": "<image>", "video_token": "<video>"})
        side = tiny.image_size
        pinpoints = [[side * r, side * c] for r in range(1, 3) for c in range(1, 3)]
        image_processor = LlavaOnevisionImageProcessorPil(size={"height": side, "width": side},
                                                          image_grid_pinpoints=pinpoints)
        return tiny_onevision(tiny, tokenizer, pinpoints, cfg.attn_implementation), tokenizer, image_processor

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> ModelAdapter:
        """As the base; fails unless the model's ``vision_feature_select_strategy`` is ``full``."""
        adapter = super().from_config(cfg)
        if adapter.base_model.config.vision_feature_select_strategy != "full":
            raise ValueError("LLaVA-OneVision adapter expects vision_feature_select_strategy='full' (SigLIP, no CLS)")
        return adapter

    @property
    def _side(self) -> tuple[int, int]:
        """(tower input size in pixels, base-view tokens per side)."""
        vision = self.base_model.config.vision_config
        return vision.image_size, vision.image_size // vision.patch_size

    def plan_images(self, image_sizes: Sequence[tuple[int, int]]) -> list[ImageGeometry]:
        """One image: its anyres geometry; several: each its base view only."""
        if len(image_sizes) == 1:
            return [self.image_geometry(image_sizes[0])]
        return [self._base_view_geometry(size) for size in image_sizes]

    def _base_view_geometry(self, image_size: tuple[int, int]) -> ImageGeometry:
        """Several images: each padded to square, resized to the tower's size; g × g tokens + one newline."""
        _, cells = self._side
        square, (left, top) = square_padding(image_size)
        scale = cells / square
        grid = PatchGrid(rows=cells, cols=cells, token_offset=0, scale_x=scale, scale_y=scale,
                         offset_x=left * scale, offset_y=top * scale)
        return ImageGeometry(image_size=image_size, num_tokens=cells * cells + 1, grids=(grid,))

    def image_geometry(self, image_size: tuple[int, int]) -> ImageGeometry:
        """One image (anyres): base view, then the unpadded high-resolution grid with a newline per row."""
        width, height = image_size
        side, cells = self._side
        config = self.base_model.config
        best_h, best_w = select_best_resolution((height, width), config.image_grid_pinpoints)
        rows, cols = best_h // side * cells, best_w // side * cells
        if width / height > cols / rows:
            rows -= (rows - int(round(height * (cols / width), 7))) // 2 * 2
        else:
            cols -= (cols - int(round(width * (rows / height), 7))) // 2 * 2
        most = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
        ratio = math.sqrt(rows * cols / (most * cells * cells))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
        base = PatchGrid(rows=cells, cols=cells, token_offset=0, scale_x=cells / width, scale_y=cells / height,
                         offset_x=0.0, offset_y=0.0)
        high = PatchGrid(rows=rows, cols=cols, token_offset=cells * cells, scale_x=cols / width,
                         scale_y=rows / height, offset_x=0.0, offset_y=0.0, row_stride=cols + 1)
        return ImageGeometry(image_size=image_size, num_tokens=cells * cells + rows * (cols + 1), grids=(base, high))

    def pixel_inputs(self, images: list[Image.Image], geometries: list[ImageGeometry]
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Pixel values (only each image's base view when there are several) and ``image_sizes``."""
        out = self.image_processor(images=[images], return_tensors="pt")
        pixels = out["pixel_values"]
        if len(images) > 1:
            pixels = pixels[:, :1]  # several images: only the base view is used
        return pixels, {"image_sizes": out["image_sizes"]}

    def collate_images(self, samples: Sequence[EncodedSample]) -> dict[str, torch.Tensor]:
        """Views padded to the most views per image; ``batch_num_images`` holds each sample's image count."""
        with_images = [s.pixel_values for s in samples if s.pixel_values is not None]
        counts = torch.tensor([0 if s.pixel_values is None else s.pixel_values.shape[0] for s in samples])
        if not with_images:
            return {}
        most = max(p.shape[1] for p in with_images)
        padded = [torch.cat([p, p.new_zeros((p.shape[0], most - p.shape[1], *p.shape[2:]))], dim=1)
                  for p in with_images]
        sizes = torch.cat([s.extra["image_sizes"] for s in samples if s.pixel_values is not None], dim=0)
        return {"pixel_values": torch.cat(padded, dim=0), "image_sizes": sizes, "batch_num_images": counts}



def tiny_onevision(tiny: TinyModelConfig, tokenizer: PreTrainedTokenizerFast, pinpoints: list[list[int]],
                   attn: str) -> nn.Module:
    """A tiny LLaVA-OneVision with random weights: a Qwen2 decoder, a SigLIP tower without head, anyres over
    ``pinpoints``."""
    config = LlavaOnevisionConfig(
        text_config={"model_type": "qwen2", **tiny_text_config(tiny, tokenizer)},
        vision_config={"model_type": "siglip_vision_model", "hidden_size": tiny.vision_hidden_size,
                       "intermediate_size": 2 * tiny.vision_hidden_size, "num_hidden_layers": tiny.vision_layers,
                       "num_attention_heads": 2, "image_size": tiny.image_size, "patch_size": tiny.patch_size,
                       "vision_use_head": False},
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=pinpoints,
        vision_aspect_ratio=f"anyres_max_{tiny.max_tiles}",
    )
    config._attn_implementation = attn
    return seeded_init(LlavaOnevisionForConditionalGeneration, config, tiny.init_seed)
