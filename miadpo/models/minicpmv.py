"""MiniCPM-V 4.6 (``MiniCPMV4_6ForConditionalGeneration``): ``minicpm_v4_6`` from weights, ``tiny_minicpm_v4_6`` in
code.

Each image is seen as a global view plus, when it is larger than ``scale_resolution²``, ``rows × cols`` slices of a
resized copy (MiniCPM-V's slicing rule: the grid whose aspect ratio is closest to the image's among about
``area / scale_resolution²`` slices, at most ``max_slice_nums``). Every view keeps its aspect ratio in patches; the
vision tower's window-attention merger (after layer ``insert_layer_id``) and the downsample MLP (the projector) each
merge 2 × 2 cells, so a view of ``h × w`` patches gives ``h/4 × w/4`` tokens, row-major. In the prompt image ``k``
(0-based in its prompt) is ``<image_id>k</image_id><image>`` + the global view's tokens + ``</image>``, then one
line per slice row of ``<slice>`` + tokens + ``</slice>``; the pixels of all views travel packed in one NaViT row
(``pixel_values`` of shape ``(1, 3, patch, Σ h·w·patch)``) with their patch grids in ``target_sizes``.

The language model is Qwen3.5's hybrid decoder (``qwen3_5_text``): the shared-prefix DPO forward is not exact for it
(``shared_prefix_exact``) and selection reads a full-attention layer, as for Qwen3.5. The marker tokens are read off
the tokenizer (``image_token``, ``image_start_token``, …), where MiniCPM-V's tokenizers name them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration, PreTrainedTokenizerFast
from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil

from miadpo.config import ModelConfig, TinyModelConfig
from miadpo.models.base import SeparatePartsAdapter, unwrapped
from miadpo.models.geometry import ImageGeometry, PatchGrid
from miadpo.models.idefics3 import tile_offsets
from miadpo.models.qwen2_vl import CHATML_NAMES, CHATML_SPECIALS
from miadpo.models.qwen3_vl import Qwen35Adapter
from miadpo.models.samples import EncodedSample
from miadpo.models.templates import ChatTemplate
from miadpo.models.tiny import build_tiny_tokenizer, seeded_init

# The named marker tokens (tokenizer attribute → the tiny tokenizer's token), as MiniCPM-V 4.6's processor reads them.
MINICPM_NAMED = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "image_start_token": "<image>",
                 "image_end_token": "</image>", "slice_start_token": "<slice>", "slice_end_token": "</slice>",
                 "image_id_start_token": "<image_id>", "image_id_end_token": "</image_id>"}
MINICPM_SPECIALS = [*CHATML_SPECIALS, *MINICPM_NAMED.values(), "<think>", "</think>"]


class MiniCPMV46Adapter(SeparatePartsAdapter):
    """Adapter for MiniCPMV4_6ForConditionalGeneration (global view + slices on a Qwen3.5 hybrid decoder)."""

    model_class = MiniCPMV4_6ForConditionalGeneration
    image_processor_class = MiniCPMV4_6ImageProcessorPil
    # The window-attention merger sits inside the vision tower (it follows freeze_vision_tower); the downsample MLP
    # into the language model's width is the projector.
    module_paths = {"vision_tower": "model.vision_tower", "projector": "model.merger", "llm": "model.language_model"}
    image_feature_inputs = ("pixel_values", "target_sizes")
    shared_prefix_exact = False

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, template: ChatTemplate,
                 cfg: ModelConfig) -> None:
        self.markers = {name: getattr(tokenizer, name, None) or token for name, token in MINICPM_NAMED.items()}
        self.image_token = self.markers["image_token"]
        super().__init__(model, tokenizer, image_processor, template, cfg)

    @classmethod
    def build_tiny(cls, cfg: ModelConfig) -> tuple[nn.Module, PreTrainedTokenizerFast, MiniCPMV4_6ImageProcessorPil]:
        """(model, tokenizer, image processor) of ``tiny_minicpm_v4_6``: views of ``tiny.image_size``² pixels, at most
        ``tiny.max_tiles`` slices."""
        tiny = cfg.tiny
        tokenizer = build_tiny_tokenizer(tiny.vocab_size, MINICPM_SPECIALS, CHATML_NAMES, extra=MINICPM_NAMED)
        # Views of scale_resolution² pixels = (image_size / patch_size)² patches, as the release's 448 px / 14 px.
        image_processor = MiniCPMV4_6ImageProcessorPil(scale_resolution=tiny.image_size, patch_size=tiny.patch_size,
                                                       max_slice_nums=tiny.max_tiles)
        return cls.tiny_model(tiny, tokenizer, cfg.attn_implementation), tokenizer, image_processor

    @classmethod
    def tiny_model(cls, tiny: TinyModelConfig, tokenizer: PreTrainedTokenizerFast, attn: str) -> nn.Module:
        """Qwen3.5's tiny hybrid decoder; a vision tower whose window merger follows its first layer."""
        text = {"model_type": "qwen3_5_text", **Qwen35Adapter.tiny_text_config(tiny, tokenizer)}
        vision = {"hidden_size": tiny.vision_hidden_size, "intermediate_size": 2 * tiny.vision_hidden_size,
                  "num_hidden_layers": tiny.vision_layers, "num_attention_heads": 2, "image_size": tiny.image_size,
                  "patch_size": tiny.patch_size, "window_kernel_size": [2, 2]}
        config = MiniCPMV4_6Config(text_config=text, vision_config=vision, insert_layer_id=0,
                                   image_token_id=tokenizer.convert_tokens_to_ids(MINICPM_NAMED["image_token"]),
                                   video_token_id=tokenizer.convert_tokens_to_ids(MINICPM_NAMED["video_token"]))
        config._attn_implementation = attn
        return seeded_init(cls.model_class, config, tiny.init_seed)

    # ----- views and their tokens ----------------------------------------------------------------------------------
    @property
    def _merge(self) -> int:
        """Patches per token along a side: 4 (two 2 × 2 merges) or 2 in the "4x" mode."""
        return 2 if self.image_processor.downsample_mode == "4x" else 4

    def image_geometry(self, image_size: tuple[int, int]) -> ImageGeometry:
        """The global view's grid, then one grid per slice (row-major) when the image is sliced."""
        processor, width, height = self.image_processor, *image_size
        patch, mode, resolution = processor.patch_size, processor.downsample_mode, processor.scale_resolution
        grid = (processor.get_sliced_grid((height, width), processor.max_slice_nums, resolution)
                if processor.slice_mode else None)
        view_h, view_w = processor.find_best_resize((height, width), resolution, patch, mode,
                                                    allow_upscale=grid is None)
        views = [(view_h // patch // self._merge, view_w // patch // self._merge)]
        rows, cols = grid or (0, 0)
        if grid is not None:
            refine_h, refine_w = processor.get_refine_size((height, width), grid, resolution, patch, mode,
                                                           allow_upscale=True)
            views.append((refine_h // rows // patch // self._merge, refine_w // cols // patch // self._merge))
        layout = (rows, cols, views[0][0] * views[0][1], views[-1][0] * views[-1][1] if grid else 0)
        offsets, span = self._offsets(layout)
        (global_rows, global_cols), (slice_rows, slice_cols) = views[0], views[-1]
        grids = [PatchGrid(rows=global_rows, cols=global_cols, token_offset=offsets[0], scale_x=global_cols / width,
                           scale_y=global_rows / height, offset_x=0.0, offset_y=0.0)]
        grids += [PatchGrid(rows=slice_rows, cols=slice_cols, token_offset=offsets[1 + k],
                            scale_x=cols * slice_cols / width, scale_y=rows * slice_rows / height,
                            offset_x=-(k % cols) * slice_cols, offset_y=-(k // cols) * slice_rows)
                  for k in range(rows * cols)]
        return ImageGeometry(image_size=image_size, num_tokens=span, grids=tuple(grids),
                             image_tokens=sum(g.rows * g.cols for g in grids), layout=layout)

    def _offsets(self, layout: tuple[int, ...]) -> tuple[list[int], int]:
        cache: dict[tuple[int, ...], tuple[list[int], int]] = self.__dict__.setdefault("_layouts", {})
        if layout not in cache:
            cache[layout] = tile_offsets(self.tokenizer, self.image_token_id, self._placeholder(layout, 0))
        return cache[layout]

    def _placeholder(self, layout: tuple[int, ...], index: int) -> str:
        rows, cols, global_tokens, slice_tokens = layout
        m = self.markers
        numbered = self.image_processor.use_image_id
        number = f"{m['image_id_start_token']}{index}{m['image_id_end_token']}" if numbered else ""
        text = f"{number}{m['image_start_token']}{self.image_token * global_tokens}{m['image_end_token']}"
        one_slice = f"{m['slice_start_token']}{self.image_token * slice_tokens}{m['slice_end_token']}"
        return text + "\n".join(one_slice * cols for _ in range(rows))

    def image_placeholder(self, geometry: ImageGeometry) -> str:
        """The placeholder of an image numbered 0 (:meth:`image_placeholders` numbers a prompt's images)."""
        return self._placeholder(geometry.layout, 0)

    def image_placeholders(self, geometries: Sequence[ImageGeometry]) -> list[str]:
        """Image ``k`` of a prompt carries its index, ``<image_id>k</image_id>``, as MiniCPM-V's processor writes it
        (unless the image processor's ``use_image_id`` is off)."""
        return [self._placeholder(geometry.layout, k) for k, geometry in enumerate(geometries)]

    def pixel_inputs(self, images: list[Image.Image], geometries: list[ImageGeometry]
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The packed pixels and ``target_sizes``; fails when a slice grid disagrees with the geometry."""
        out = self.image_processor(images=images, return_tensors="pt")
        for geometry, grid in zip(geometries, out["grids"]):
            if tuple(grid) != (geometry.layout[0], geometry.layout[1]):
                raise RuntimeError(f"image processor sliced {grid}; the geometry says {geometry.layout[:2]}")
        return out["pixel_values"], {"target_sizes": out["target_sizes"]}

    def collate_images(self, samples: Sequence[EncodedSample]) -> dict[str, torch.Tensor]:
        """Every view of every sample in one NaViT row (the model reads ``pixel_values[:1]``), in batch order."""
        with_images = [s for s in samples if s.pixel_values is not None and s.pixel_values.numel()]
        if not with_images:
            return {}
        return {"pixel_values": torch.cat([s.pixel_values for s in with_images], dim=-1),
                "target_sizes": torch.cat([s.extra["target_sizes"] for s in with_images], dim=0)}

    def hidden_forward(self, model: nn.Module, **inputs: Any) -> tuple[torch.Tensor, Any]:
        """MiniCPM-V 4.6's forward takes no ``logits_to_keep`` (it would compute every logit): run its inner model,
        which stops at the decoder's last (normed) hidden states."""
        output = unwrapped(model).model(**inputs)
        return output.last_hidden_state, output
