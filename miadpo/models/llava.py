"""LLaVA-1.5 family (LlavaForConditionalGeneration): ``tiny_llava`` built in code and ``llava15`` from weights.

Images are padded to square with the CLIP mean colour before the image processor (as LLaVA-1.5 was trained;
the HF processor alone would centre-crop and cut the outer tiles of a wide grid collage). Each ``<image>``
becomes ``image_seq_length`` tokens; the geometry follows pad → resize → centre-crop → patches.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaImageProcessorPil, LlavaProcessor

from miadpo.config import ModelConfig
from miadpo.models.base import ModelAdapter
from miadpo.models.geometry import ImageGeometry, PatchGrid, square_padding
from miadpo.models.loading import check_weights_path, load_pretrained, torch_dtype
from miadpo.models.templates import get_template
from miadpo.models.tiny import build_tiny_image_processor, build_tiny_llava, build_tiny_tokenizer


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """Centre the image on a square canvas; returns the canvas and the paste offset (x, y)."""
    if image.width == image.height:
        return image, (0, 0)
    side, offset = square_padding(image.size)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, offset)
    return canvas, offset


class LlavaAdapter(ModelAdapter):
    """Adapter for transformers' LlavaForConditionalGeneration."""

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> LlavaAdapter:
        """The tiny LLaVA when ``cfg.path`` is null, else the checkpoint's model, tokenizer and image processor."""
        if cfg.path is None:
            tokenizer = build_tiny_tokenizer(cfg.tiny.vocab_size)
            image_processor = build_tiny_image_processor(cfg.tiny.image_size)
            model = build_tiny_llava(cfg.tiny, tokenizer, cfg.attn_implementation)
        else:
            path = check_weights_path(cfg)
            processor = AutoProcessor.from_pretrained(path)
            tokenizer, image_processor = processor.tokenizer, processor.image_processor
            model = load_pretrained(LlavaForConditionalGeneration, path, dtype=torch_dtype(cfg.dtype),
                                    attn_implementation=cfg.attn_implementation)
        model.to(torch_dtype(cfg.dtype))
        return cls(model, tokenizer, image_processor, get_template(cfg.template), cfg)

    @property
    def _config(self) -> Any:
        return self.base_model.config

    def _token_count(self) -> int:
        vision = self._config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        return patches + (1 if self._config.vision_feature_select_strategy == "full" else 0)

    def _fill_colour(self) -> tuple[int, int, int]:
        """``int(255 · mean)`` per channel: LLaVA-1.5's expand2square fill (and transformers' ``do_pad``)."""
        return tuple(int(255 * m) for m in self.image_processor.image_mean)

    def image_geometry(self, image_size: tuple[int, int]) -> ImageGeometry:
        """Map original pixels through pad → resize (shortest edge) → centre crop → patch cells."""
        width, height = image_size
        if self.cfg.pad_to_square:
            side, offset = square_padding(image_size)
            pad_w = pad_h = side
        else:
            (pad_w, pad_h), offset = (width, height), (0, 0)
        processor = self.image_processor
        size = processor.size
        short = size.get("shortest_edge")
        if short:
            if pad_w <= pad_h:
                new_w, new_h = short, int(short * pad_h / pad_w)
            else:
                new_w, new_h = int(short * pad_w / pad_h), short
        else:
            new_w, new_h = size["width"], size["height"]
        crop_w, crop_h = new_w, new_h
        if processor.do_center_crop:
            crop_w, crop_h = processor.crop_size["width"], processor.crop_size["height"]
        left, top = (new_w - crop_w) // 2, (new_h - crop_h) // 2
        patch = self._config.vision_config.patch_size
        scale_x, scale_y = new_w / pad_w, new_h / pad_h
        strategy_full = self._config.vision_feature_select_strategy == "full"
        grid = PatchGrid(
            rows=crop_h // patch,
            cols=crop_w // patch,
            token_offset=1 if strategy_full else 0,
            scale_x=scale_x / patch,
            scale_y=scale_y / patch,
            offset_x=(offset[0] * scale_x - left) / patch,
            offset_y=(offset[1] * scale_y - top) / patch,
        )
        return ImageGeometry(image_size=image_size, num_tokens=self._token_count(), grids=(grid,))

    def pixel_inputs(self, images: list[Image.Image], geometries: list[ImageGeometry]
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Pixel values of the images (padded to square first when ``pad_to_square``), no extra inputs."""
        if self.cfg.pad_to_square:
            images = [pad_to_square(image, self._fill_colour())[0] for image in images]
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"], {}

    def processor_for_saving(self) -> LlavaProcessor:
        """A LlavaProcessor that preprocesses as miadpo does: its image processor pads to square with the same
        fill (``do_pad``), and its chat template renders miadpo's prompt with BOS."""
        vision = self._config.vision_config
        return LlavaProcessor(
            image_processor=saving_image_processor(self.image_processor, self.cfg.pad_to_square),
            tokenizer=self.tokenizer,
            patch_size=vision.patch_size,
            vision_feature_select_strategy=self._config.vision_feature_select_strategy,
            num_additional_image_tokens=1,
            chat_template=self.chat_template(),
        )


def saving_image_processor(processor: Any, pad_to_square: bool) -> LlavaImageProcessorPil:
    """The CLIP settings of ``processor`` as transformers' LLaVA image processor, padding to square when miadpo
    does (its fill is ``int(255 · mean)``, as LLaVA-1.5's ``expand2square``)."""
    keys = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
            "do_normalize", "image_mean", "image_std", "do_convert_rgb")
    settings = {key: getattr(processor, key) for key in keys if getattr(processor, key, None) is not None}
    return LlavaImageProcessorPil(**settings, do_pad=pad_to_square)
