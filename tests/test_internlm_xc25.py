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


def tiny_decoder():
    import torch

    from miadpo.models.internlm_xc25.internlm2 import InternLM2Config, InternLM2Model

    torch.manual_seed(0)
    cfg = InternLM2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                          num_kv_heads=2, plora_r=4, plora_alpha=8, rope_theta=10000.0)
    model = InternLM2Model(cfg).eval()
    for name, parameter in model.named_parameters():
        if "Plora_B" in name:
            torch.nn.init.normal_(parameter, std=0.2)
    return cfg, model


def test_checkpoint_parameter_names() -> None:
    _, model = tiny_decoder()
    names = set(model.state_dict())
    layer = "layers.0."
    for part in ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
        assert {f"{layer}{part}.weight", f"{layer}{part}.Plora_A.weight", f"{layer}{part}.Plora_B.weight"} <= names
    assert {"tok_embeddings.weight", "norm.weight", f"{layer}attention_norm.weight", f"{layer}ffn_norm.weight"} <= names
    assert not any(name.endswith(".bias") for name in names)


def test_partial_lora_acts_only_at_image_positions() -> None:
    import torch

    cfg, model = tiny_decoder()
    x = torch.randn(2, 7, cfg.hidden_size)
    im_mask = torch.zeros(2, 7, dtype=torch.bool)
    im_mask[0, 2:5] = True
    im_mask[1, 4:6] = True
    linear = model.layers[0].attention.wqkv
    with torch.no_grad():
        moved = (linear(x, im_mask) - linear(x)).abs().amax(-1) > 0
        assert torch.equal(moved, im_mask)
        mask = torch.ones(2, 7, dtype=torch.long)
        with_lora = model(x, mask, im_mask)
        without = model(x, mask, None)
    changed = (with_lora - without).abs().amax(-1) > 1e-6
    assert changed[im_mask].all()
    assert not changed[0, :2].any() and not changed[1, :4].any()  # causal: positions before the first image token


def test_packed_wqkv_equals_separate_grouped_query_attention() -> None:
    """Slice wqkv into per-group [query heads…, key, value] blocks and run textbook GQA: same output."""
    import torch
    from torch.nn import functional as F

    from miadpo.models.internlm_xc25.internlm2 import rotate

    cfg, model = tiny_decoder()
    attention = model.layers[0].attention
    x = torch.randn(1, 5, cfg.hidden_size)
    positions = torch.arange(5)[None]
    cos, sin = model.rotary(positions, x.dtype)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    group, d = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    w = attention.wqkv.weight.view(cfg.num_kv_heads, group + 2, d, cfg.hidden_size)
    heads = []
    for h in range(cfg.num_heads):
        kv = h // group
        q = x @ w[kv, h % group].T
        k, v = x @ w[kv, group].T, x @ w[kv, group + 1].T
        q, k = rotate(q[:, None], cos, sin), rotate(k[:, None], cos, sin)
        heads.append(F.scaled_dot_product_attention(q, k, v[:, None], attn_mask=causal))
    expected = attention.wo(torch.cat(heads, dim=1).transpose(1, 2).reshape(1, 5, -1))
    with torch.no_grad():
        assert torch.allclose(attention(x, cos, sin, causal, None), expected, atol=1e-5)


def test_vision_tokens_stitch_crops_row_major_with_separators() -> None:
    """A tiny tower (56-px crops → 2 × 2 cells): each detail crop's pixels move only its own cells of the
    stitched map; separator positions hold the projected separators; the count follows the layout."""
    import torch
    from transformers import CLIPVisionConfig

    from miadpo.models.internlm_xc25.hd import HDLayout
    from miadpo.models.internlm_xc25.vision import VisionEncoder

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=56, patch_size=14)
    encoder = VisionEncoder(config, hidden_size=24).eval()
    torch.nn.init.normal_(encoder.plora_sub_GN)
    torch.nn.init.normal_(encoder.plora_glb_GN)
    layout = HDLayout(size=(3, 2), resized=(3, 2), padded=(3, 2), rows=2, cols=3)
    pixels = torch.randn(7, 3, 56, 56)
    with torch.no_grad():
        (tokens,) = encoder(pixels, [layout])
        cells = 2
        assert tokens.shape[0] == cells * (cells + 1) + 1 + layout.rows * cells * (layout.cols * cells + 1)
        sub, glb = encoder.vision_proj(encoder.plora_sub_GN.view(1, -1)), encoder.vision_proj(
            encoder.plora_glb_GN.view(1, -1))
        detail_start, stride = cells * (cells + 1) + 1, layout.cols * cells + 1
        assert torch.allclose(tokens[detail_start - 1], glb[0])
        for row in range(layout.rows * cells):
            assert torch.allclose(tokens[detail_start + row * stride + stride - 1], sub[0])
        crop = 5  # row 1, col 2 of the 2 × 3 crop grid (pixel index 0 is the global view)
        changed = pixels.clone()
        changed[1 + crop] += 1.0
        (moved,) = encoder(changed, [layout])
    diff = (moved - tokens).abs().amax(-1) > 1e-6
    expected = {detail_start + (1 * cells + r) * stride + 2 * cells + c for r in range(cells) for c in range(cells)}
    assert set(torch.nonzero(diff).flatten().tolist()) == expected
