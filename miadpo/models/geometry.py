"""Image geometry: which part of an original image each of its tokens sees, through the model's preprocessing.

An image's span of tokens holds one or more rectangular :class:`PatchGrid` s (the whole image, tiles, crops);
:class:`ImageGeometry` maps a pixel box of the original image to per-token coverage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in original-image pixels


@dataclass(frozen=True)
class PatchGrid:
    """One rectangular grid of image tokens: the whole image, or one tile/crop of it.

    Original-image pixel ``(x, y)`` lies at cell coordinates ``(x * scale_x + offset_x, y * scale_y +
    offset_y)``; cell ``(r, c)`` covers ``[c, c+1) × [r, r+1)`` and is the token at span position
    ``token_offset + r * row_stride + c`` (``row_stride`` > ``cols`` when each row ends with extra tokens, e.g.
    LLaVA-OneVision's newline token).
    """

    rows: int
    cols: int
    token_offset: int
    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    row_stride: int | None = None

    def coverage(self, box: Box) -> np.ndarray:
        """Fraction of each cell's area inside ``box``, shape (rows, cols)."""
        x0, y0, x1, y1 = box
        cx0, cx1 = x0 * self.scale_x + self.offset_x, x1 * self.scale_x + self.offset_x
        cy0, cy1 = y0 * self.scale_y + self.offset_y, y1 * self.scale_y + self.offset_y
        cols = np.arange(self.cols)
        rows = np.arange(self.rows)
        overlap_x = np.clip(np.minimum(cols + 1, cx1) - np.maximum(cols, cx0), 0.0, 1.0)
        overlap_y = np.clip(np.minimum(rows + 1, cy1) - np.maximum(rows, cy0), 0.0, 1.0)
        return np.outer(overlap_y, overlap_x)

    def token_positions(self) -> np.ndarray:
        """Span position of every cell, shape (rows, cols)."""
        stride = self.row_stride or self.cols
        return self.token_offset + np.arange(self.rows)[:, None] * stride + np.arange(self.cols)[None, :]


@dataclass(frozen=True)
class ImageGeometry:
    """Where one image's tokens sit in its span and which part of the image each token sees."""

    image_size: tuple[int, int]  # (width, height) of the original image
    num_tokens: int  # length of the image's span in the sequence (first to last image token)
    grids: tuple[PatchGrid, ...]
    # Image-token ids inside the span, when the span also holds text markers (e.g. Idefics3's tile tags).
    image_tokens: int | None = None
    # Backbone-specific layout of the span (tile rows/cols, ...), used to render the placeholder text.
    layout: tuple[int, ...] = ()

    @property
    def image_token_ids(self) -> int:
        """Image-token ids in the span: ``image_tokens`` when set, else the whole span."""
        return self.num_tokens if self.image_tokens is None else self.image_tokens

    def token_coverage(self, box: Box) -> np.ndarray:
        """For each token of the span, the fraction of its cell inside ``box`` (0 for non-grid tokens)."""
        weights = np.zeros(self.num_tokens, dtype=np.float64)
        for grid in self.grids:
            weights[grid.token_positions()] = grid.coverage(box)
        return weights

    def token_mask(self, box: Box, min_coverage: float = 0.5) -> np.ndarray:
        """Tokens whose cell lies at least ``min_coverage`` inside ``box``."""
        return self.token_coverage(box) >= min_coverage


def square_padding(image_size: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """Side of the square canvas an image of ``(width, height)`` is centred on, and its paste offset (x, y).

    The offset rounds down, as LLaVA's ``expand2square``; ``PIL.ImageOps.pad`` rounds half to even instead (it
    differs when the side difference is 3 mod 4), so it is not used.
    """
    width, height = image_size
    side = max(width, height)
    return side, ((side - width) // 2, (side - height) // 2)
