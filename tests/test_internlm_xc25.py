"""InternLM-XComposer-2.5: the high-resolution crop scheme and the chat template, against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from miadpo.models.internlm_xc25.hd import crops, hd_geometry, hd_image, hd_layout
from miadpo.templates import get_template

# (size, hd_num) → (resized, padded, rows, cols, tokens), worked out by hand from the scheme:
# tokens = 400·(rows·cols + 1) + 1 + 20·(rows + 1).
CASES = [
    # ratio 4/3: scale 5 fits 24 (5·ceil(3.75) = 20) but is capped by ceil(1920/560) = 4 → 2240 × 1680.
    ((1920, 1440), 24, (2240, 1680), (2240, 1680), 3, 4, 5281),
    # the same image upright: transposed, laid out, transposed back (padding would go to the right).
    ((1440, 1920), 24, (1680, 2240), (1680, 2240), 4, 3, 5301),
    # small square: capped at one crop → the 841 tokens of a 1 × 1 grid.
    ((500, 500), 24, (560, 560), (560, 560), 1, 1, 841),
    # several images use hd_num 6: ratio 10/3, scale 3 fits (3·1) but ceil(1000/560) = 2 → 1120 × 336, padded.
    ((1000, 300), 6, (1120, 336), (1120, 560), 1, 2, 1241),
    # hd_num 1: one crop, 560 × 420 padded to 560 × 560.
    ((1920, 1440), 1, (560, 420), (560, 560), 1, 1, 841),
]


@pytest.mark.parametrize(("size", "hd_num", "resized", "padded", "rows", "cols", "tokens"), CASES)
def test_crop_layout_matches_hand_computed_values(size, hd_num, resized, padded, rows, cols, tokens) -> None:
    layout = hd_layout(size, hd_num)
    assert (layout.resized, layout.padded, layout.rows, layout.cols, layout.num_tokens) == (
        resized, padded, rows, cols, tokens)
    geometry = hd_geometry(layout)
    separators = rows * 20 + 20 + 1  # one sub_GN per token row, plus glb_GN
    assert sum(g.rows * g.cols for g in geometry.grids) == geometry.num_tokens - separators


def test_pixels_are_padded_white_at_the_bottom_or_right() -> None:
    wide, layout = hd_image(Image.new("RGB", (1000, 300), (200, 10, 10)), hd_num=6)
    pixels = np.asarray(wide)
    assert pixels.shape == (560, 1120, 3)
    assert (pixels[:330] == (200, 10, 10)).all() and (pixels[340:] == 255).all()
    views = crops(wide, layout)
    assert len(views) == 1 + layout.rows * layout.cols and all(v.size == (560, 560) for v in views)
    assert (np.asarray(views[2])[:300] == (200, 10, 10)).all()  # the right crop holds the image's right half
    tall, _ = hd_image(Image.new("RGB", (300, 1000), (10, 10, 200)), hd_num=6)
    pixels = np.asarray(tall)
    assert pixels.shape == (1120, 560, 3)
    assert (pixels[:, :330] == (10, 10, 200)).all() and (pixels[:, 340:] == 255).all()


def test_a_pixel_box_maps_to_global_and_detail_tokens() -> None:
    """1000 × 300 → 1120 × 336 on 1120 × 560: the right half of the image is detail columns 20–39 of token rows
    0–11 (28 px per token) and global columns 10–19 of rows 0–11 (the 1120 × 560 canvas squeezed to 20 × 20)."""
    geometry = hd_geometry(hd_layout((1000, 300), 6))
    coverage = geometry.token_coverage((500, 0, 1000, 300))
    expected = {r * 21 + c for r in range(12) for c in range(10, 20)}  # global rows end with a separator
    expected |= {421 + r * 41 + c for r in range(12) for c in range(20, 40)}  # after 420 global tokens + glb_GN
    assert set(np.flatnonzero(coverage > 0.99)) == expected
    assert set(np.flatnonzero(coverage > 0)) == expected
    separators = [r * 21 + 20 for r in range(20)] + [420] + [421 + r * 41 + 40 for r in range(20)]
    assert not coverage[separators].any()


def test_chat_template_renders_the_known_conversation() -> None:
    text = get_template("internlm_xc25").render("Image1 <ImageHere>; Image2 <ImageHere>; Which is red?")
    assert text == ("[UNUSED_TOKEN_146]user\nImage1 <ImageHere>; Image2 <ImageHere>; Which is red?"
                    "[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n")
    assert get_template("internlm_xc25").end_token == "[UNUSED_TOKEN_145]"
