"""InternLM-XComposer-2.5's high-resolution image scheme: crop grid, pixels, token layout and geometry.

Written from the model's public description (facts, not code):

- A portrait image is first transposed to landscape. Its width becomes ``scale × 560``, with ``scale`` the
  largest integer such that ``scale · ceil(scale / ratio) ≤ hd_num`` (``ratio`` = width / height), capped at
  ``ceil(width / 560)``; the height follows the aspect ratio and is padded
  with white at the bottom to a multiple of 560; a portrait image is transposed back (so it is padded on the
  right). The padded image (CLIP-normalised) is cut into ``rows × cols`` crops of 560 × 560, row-major, and a
  global view is the normalised padded image interpolated bicubically (on the tensor) to 560 × 560.
- The CLIP ViT-L/14 tower sees 40 × 40 patches per crop; every 2 × 2 block of patches is concatenated into one
  token, so a crop gives 20 × 20 tokens.
- Token order of one image: the global view's 20 rows, each followed by the learned ``sub_GN`` separator
  (20 × 21 tokens); the ``glb_GN`` separator; then the crops stitched into one ``20·rows × 20·cols`` map whose
  every row is followed by ``sub_GN``. In all ``400·(rows·cols + 1) + 1 + 20·(rows + 1)`` tokens.

Tiny test models use smaller crops (``crop`` pixels, ``cells`` tokens per side); the scheme is the same.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from miadpo.models.geometry import ImageGeometry, PatchGrid

CROP = 560  # pixels per crop side
CELLS = 20  # tokens per crop side after the 2 × 2 patch merge
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class HDLayout:
    """Where an image of ``size`` (width, height) goes: resized to ``resized``, padded to ``padded``."""

    size: tuple[int, int]
    resized: tuple[int, int]
    padded: tuple[int, int]
    rows: int
    cols: int
    crop: int = CROP
    cells: int = CELLS

    @property
    def num_tokens(self) -> int:
        """Tokens of the image's span: global view and stitched crops with their ``sub_GN`` row ends, and ``glb_GN``."""
        per_crop = self.cells * self.cells
        return per_crop * (self.rows * self.cols + 1) + 1 + self.cells * (self.rows + 1)


def hd_scale(width: int, height: int, hd_num: int, crop: int = CROP) -> int:
    """Crop columns of a landscape image (width ≥ height): the largest scale whose grid fits in ``hd_num``."""
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:
        scale += 1
    return min(scale - 1, math.ceil(width / crop))


def hd_layout(size: tuple[int, int], hd_num: int, crop: int = CROP, cells: int = CELLS) -> HDLayout:
    """The :class:`HDLayout` of an image of ``size`` (width, height) with at most ``hd_num`` crops."""
    width, height = size
    portrait = width < height
    if portrait:
        width, height = height, width
    scale = max(1, hd_scale(width, height, hd_num, crop))
    new_w = scale * crop
    new_h = int(new_w / (width / height))
    padded_h = math.ceil(new_h / crop) * crop
    resized, padded = (new_w, new_h), (new_w, padded_h)
    if portrait:
        resized, padded = resized[::-1], padded[::-1]
    return HDLayout(size=size, resized=resized, padded=padded, rows=padded[1] // crop, cols=padded[0] // crop,
                    crop=crop, cells=cells)


def hd_image(image: Image.Image, layout: HDLayout) -> Image.Image:
    """The image resized as ``layout`` says on a white canvas, padded at the bottom (right for a portrait image).

    A portrait image is resized and padded as its landscape transpose, then transposed back, in the original's
    order: PIL resizes in two passes and rounds between them, so resizing the upright image gives other pixels.
    (Not ``ImageOps.pad``: its ``contain`` rounds the height to nearest where the layout floors it.)
    """
    image = image.convert("RGB")
    portrait = layout.size[0] < layout.size[1]
    resized, padded = (layout.resized[::-1], layout.padded[::-1]) if portrait else (layout.resized, layout.padded)
    if portrait:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    canvas = Image.new("RGB", padded, WHITE)
    canvas.paste(image.resize(resized, Image.BILINEAR), (0, 0))
    return canvas.transpose(Image.Transpose.TRANSPOSE) if portrait else canvas


def hd_views(canvas: torch.Tensor, layout: HDLayout) -> torch.Tensor:
    """A normalised (3, H, W) canvas → (1 + rows·cols, 3, crop, crop): the global view (the canvas resized
    bicubically to one crop), then the crops row-major — the vision tower's batch order."""
    crop = layout.crop
    global_view = F.interpolate(canvas[None].float(), size=(crop, crop), mode="bicubic", align_corners=False)
    tiles = canvas.view(3, layout.rows, crop, layout.cols, crop).permute(1, 3, 0, 2, 4).reshape(-1, 3, crop, crop)
    return torch.cat([global_view.to(canvas.dtype), tiles])


def hd_geometry(layout: HDLayout) -> ImageGeometry:
    """Token geometry of one image: the global view's grid and the stitched crop grid (separators skipped)."""
    width, height = layout.size
    cells, cell = layout.cells, layout.crop / layout.cells  # tokens per crop side, pixels per token
    factor = layout.resized[0] / width  # original → resized pixels
    padded_w, padded_h = layout.padded
    global_view = PatchGrid(rows=cells, cols=cells, token_offset=0, scale_x=factor * cells / padded_w,
                            scale_y=factor * cells / padded_h, offset_x=0.0, offset_y=0.0, row_stride=cells + 1)
    cols = layout.cols * cells
    detail = PatchGrid(rows=layout.rows * cells, cols=cols, token_offset=cells * (cells + 1) + 1,
                       scale_x=factor / cell, scale_y=factor / cell, offset_x=0.0, offset_y=0.0, row_stride=cols + 1)
    return ImageGeometry(image_size=layout.size, num_tokens=layout.num_tokens, grids=(global_view, detail),
                         layout=(layout.rows, layout.cols))


@dataclass
class HDImageProcessor:
    """The model's image preprocessing: HD layout, white padding, CLIP normalisation, global view + crops.

    ``hd_num`` crops at most for a prompt with one image, ``hd_num_multi`` for a prompt with several (the
    model's own chat settings: 24 and 6). Saved as ``xcomposer_image_processor.json``; a directory without it
    (the official checkpoint) gets the official values.
    """

    crop_size: int = CROP
    cells: int = CELLS
    hd_num: int = 24
    hd_num_multi: int = 6
    image_mean: tuple[float, ...] = field(default=tuple(OPENAI_CLIP_MEAN))
    image_std: tuple[float, ...] = field(default=tuple(OPENAI_CLIP_STD))

    FILE = "xcomposer_image_processor.json"

    def layout(self, size: tuple[int, int], image_count: int) -> HDLayout:
        """The :class:`HDLayout` of an image of ``size`` in a prompt of ``image_count`` images."""
        hd_num = self.hd_num if image_count == 1 else self.hd_num_multi
        return hd_layout(size, hd_num, self.crop_size, self.cells)

    def canvases(self, images: Sequence[Image.Image]) -> tuple[list[torch.Tensor], list[HDLayout]]:
        """Each image resized and padded as its layout says, CLIP-normalised: (3, H, W) tensors."""
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        layouts = [self.layout(image.size, len(images)) for image in images]
        tensors = [(torch.from_numpy(np.asarray(hd_image(image, layout), dtype=np.float32) / 255.0).permute(2, 0, 1)
                    - mean) / std for image, layout in zip(images, layouts)]
        return tensors, layouts

    def __call__(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, list[HDLayout]]:
        """All views of all images, (Σ (1 + rows·cols), 3, crop, crop), and each image's layout."""
        tensors, layouts = self.canvases(images)
        return torch.cat([hd_views(canvas, layout) for canvas, layout in zip(tensors, layouts)]), layouts

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the settings to ``xcomposer_image_processor.json`` in ``directory``."""
        (Path(directory) / self.FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> HDImageProcessor:
        """The settings saved in ``directory``, or the official values where it has no ``FILE``."""
        path = Path(directory) / cls.FILE
        if not path.is_file():
            return cls()
        values = json.loads(path.read_text())
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
