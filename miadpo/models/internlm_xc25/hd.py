"""InternLM-XComposer-2.5's high-resolution image scheme: crop grid, pixels, token layout and geometry.

Written from the model's public description (facts, not code):

- A portrait image is first transposed to landscape. Its width becomes ``scale × 560``, with ``scale`` the
  largest integer such that ``scale · ceil(scale / ratio) ≤ hd_num`` (``ratio`` = width / height), capped at
  ``ceil(width / 560)``; the height follows the aspect ratio and is padded
  with white at the bottom to a multiple of 560; a portrait image is transposed back (so it is padded on the
  right). The padded image is cut into ``rows × cols`` crops of 560 × 560, row-major, and a global view is the
  padded image resized to 560 × 560.
- The CLIP ViT-L/14 tower sees 40 × 40 patches per crop; every 2 × 2 block of patches is concatenated into one
  token, so a crop gives 20 × 20 tokens.
- Token order of one image: the global view's 20 rows, each followed by the learned ``sub_GN`` separator
  (20 × 21 tokens); the ``glb_GN`` separator; then the crops stitched into one ``20·rows × 20·cols`` map whose
  every row is followed by ``sub_GN``. In all ``400·(rows·cols + 1) + 1 + 20·(rows + 1)`` tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from miadpo.models.base import ImageGeometry, PatchGrid

CROP = 560  # pixels per crop side
CELLS = 20  # tokens per crop side after the 2 × 2 patch merge
CELL = CROP // CELLS  # 28 pixels per token
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class HDLayout:
    """Where an image of ``size`` (width, height) goes: resized to ``resized``, padded to ``padded``."""

    size: tuple[int, int]
    resized: tuple[int, int]
    padded: tuple[int, int]
    rows: int
    cols: int

    @property
    def num_tokens(self) -> int:
        return 400 * (self.rows * self.cols + 1) + 1 + CELLS * (self.rows + 1)


def hd_scale(width: int, height: int, hd_num: int) -> int:
    """Crop columns of a landscape image (width ≥ height): the largest scale whose grid fits in ``hd_num``."""
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:
        scale += 1
    return min(scale - 1, math.ceil(width / CROP))


def hd_layout(size: tuple[int, int], hd_num: int) -> HDLayout:
    width, height = size
    portrait = width < height
    if portrait:
        width, height = height, width
    scale = max(1, hd_scale(width, height, hd_num))
    new_w = scale * CROP
    new_h = int(new_w / (width / height))
    padded_h = math.ceil(new_h / CROP) * CROP
    resized, padded = (new_w, new_h), (new_w, padded_h)
    if portrait:
        resized, padded = resized[::-1], padded[::-1]
    return HDLayout(size=size, resized=resized, padded=padded, rows=padded[1] // CROP, cols=padded[0] // CROP)


def hd_image(image: Image.Image, hd_num: int) -> tuple[Image.Image, HDLayout]:
    """The resized image on a white canvas padded at the bottom (right for a portrait image), and its layout."""
    layout = hd_layout(image.size, hd_num)
    canvas = Image.new("RGB", layout.padded, WHITE)
    canvas.paste(image.convert("RGB").resize(layout.resized, Image.BILINEAR), (0, 0))
    return canvas, layout


def crops(canvas: Image.Image, layout: HDLayout) -> list[Image.Image]:
    """The global view first, then the ``rows × cols`` crops, row-major (the tower's batch order)."""
    views = [canvas.resize((CROP, CROP), Image.BICUBIC)]
    for row in range(layout.rows):
        for col in range(layout.cols):
            views.append(canvas.crop((col * CROP, row * CROP, (col + 1) * CROP, (row + 1) * CROP)))
    return views


def hd_geometry(layout: HDLayout) -> ImageGeometry:
    """Token geometry of one image: the global view's grid and the stitched crop grid (separators skipped)."""
    width, height = layout.size
    factor = layout.resized[0] / width  # original → resized pixels
    padded_w, padded_h = layout.padded
    global_view = PatchGrid(rows=CELLS, cols=CELLS, token_offset=0, scale_x=factor * CELLS / padded_w,
                            scale_y=factor * CELLS / padded_h, offset_x=0.0, offset_y=0.0, row_stride=CELLS + 1)
    cols = layout.cols * CELLS
    detail = PatchGrid(rows=layout.rows * CELLS, cols=cols, token_offset=CELLS * (CELLS + 1) + 1,
                       scale_x=factor / CELL, scale_y=factor / CELL, offset_x=0.0, offset_y=0.0, row_stride=cols + 1)
    return ImageGeometry(image_size=layout.size, num_tokens=layout.num_tokens, grids=(global_view, detail),
                         layout=(layout.rows, layout.cols))
