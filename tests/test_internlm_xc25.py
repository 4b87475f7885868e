"""InternLM-XComposer-2.5: the high-resolution crop scheme and the chat template, against hand-computed values."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from test_zoo import images as zoo_images
from test_zoo import model_cfg
from torch.nn import functional as F

from miadpo.models.internlm_xc25.hd import HDImageProcessor, hd_geometry, hd_image, hd_layout
from miadpo.models.templates import get_template

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
    layout = hd_layout((1000, 300), 6)
    pixels = np.asarray(hd_image(Image.new("RGB", (1000, 300), (200, 10, 10)), layout))
    assert pixels.shape == (560, 1120, 3)
    assert (pixels[:330] == (200, 10, 10)).all() and (pixels[340:] == 255).all()
    tall = np.asarray(hd_image(Image.new("RGB", (300, 1000), (10, 10, 200)), hd_layout((300, 1000), 6)))
    assert tall.shape == (1120, 560, 3)
    assert (tall[:, :330] == (10, 10, 200)).all() and (tall[:, 340:] == 255).all()


@pytest.mark.parametrize(("size", "hd_num"), [((437, 1013), 6), ((1440, 1920), 24), ((1440, 1920), 1)])
def test_a_portrait_image_is_transposed_resized_padded_and_transposed_back(size, hd_num) -> None:
    """The original's order, pixel for pixel: PIL's two-pass resize rounds between passes, so resizing the
    upright image gives other values."""
    picture = Image.fromarray(np.random.default_rng(3).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    layout = hd_layout(size, hd_num)
    landscape = picture.transpose(Image.Transpose.TRANSPOSE)
    canvas = Image.new("RGB", layout.padded[::-1], (255, 255, 255))
    canvas.paste(landscape.resize(layout.resized[::-1], Image.BILINEAR), (0, 0))
    expected = np.asarray(canvas.transpose(Image.Transpose.TRANSPOSE))
    assert np.array_equal(np.asarray(hd_image(picture, layout)), expected)
    upright = np.asarray(picture.resize(layout.resized, Image.BILINEAR))
    assert not np.array_equal(upright, expected[: layout.resized[1], : layout.resized[0]])  # the order matters


def test_views_are_the_bicubic_global_view_then_the_crops_row_major() -> None:
    processor = HDImageProcessor(hd_num_multi=6)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 1000, 3), dtype=np.uint8))
    (canvas,), (layout,) = processor.canvases([picture, picture][:1])
    views, _ = processor([picture])
    assert views.shape == (1 + layout.rows * layout.cols, 3, 560, 560)
    expected_global = F.interpolate(canvas[None], size=(560, 560), mode="bicubic", align_corners=False)[0]
    assert torch.allclose(views[0], expected_global)
    for k in range(layout.rows * layout.cols):
        row, col = divmod(k, layout.cols)
        assert torch.equal(views[1 + k], canvas[:, row * 560 : (row + 1) * 560, col * 560 : (col + 1) * 560])
    white = (1.0 - torch.tensor(processor.image_mean)) / torch.tensor(processor.image_std)
    assert torch.allclose(canvas[:, -1, -1], white)  # padding is white after normalisation
    several, layouts = processor([picture, picture])
    assert all(lay.rows * lay.cols <= 6 for lay in layouts)  # hd_num_multi for a prompt with several images


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


def tiny_config(**overrides):
    from miadpo.models.internlm_xc25.modeling import InternLMXComposer2Config

    values = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, plora_r=4, plora_alpha=8, rotary_base=10000.0, image_placeholder_id=63,
                  vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "image_size": 28, "patch_size": 7})
    config = InternLMXComposer2Config(**{**values, **overrides})
    config._attn_implementation = "sdpa"
    return config


def tiny_decoder():
    from miadpo.models.internlm_xc25.internlm2 import InternLM2Model

    torch.manual_seed(0)
    cfg = tiny_config()
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
    from miadpo.models.internlm_xc25.internlm2 import rotate

    cfg, model = tiny_decoder()
    attention = model.layers[0].attention
    x = torch.randn(1, 5, cfg.hidden_size)
    positions = torch.arange(5)[None]
    cos, sin = model.rotary(positions, x.dtype)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    heads_, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    group, d = heads_ // kv_heads, cfg.hidden_size // heads_
    w = attention.wqkv.weight.view(kv_heads, group + 2, d, cfg.hidden_size)
    heads = []
    for h in range(heads_):
        kv = h // group
        q = x @ w[kv, h % group].T
        k, v = x @ w[kv, group].T, x @ w[kv, group + 1].T
        q, k = rotate(q[:, None], cos, sin), rotate(k[:, None], cos, sin)
        heads.append(F.scaled_dot_product_attention(q, k, v[:, None], attn_mask=causal))
    expected = attention.wo(torch.cat(heads, dim=1).transpose(1, 2).reshape(1, 5, -1))
    with torch.no_grad():
        assert torch.allclose(attention(x, cos, sin, causal, None), expected, atol=1e-5)


def test_vision_tokens_stitch_crops_row_major_with_separators() -> None:
    """A tiny tower (28-px crops → 2 × 2 cells): each detail crop's pixels move only its own cells of the
    stitched map; separator positions hold the projected separators; the count follows the layout."""
    from miadpo.models.internlm_xc25.modeling import InternLMXComposer2ForCausalLM

    torch.manual_seed(0)
    model = InternLMXComposer2ForCausalLM(tiny_config()).eval()
    rows, cols, cells = 2, 3, 2
    grid = torch.tensor([[rows, cols]])
    pixels = torch.randn(1 + rows * cols, 3, 28, 28)
    with torch.no_grad():
        (tokens,) = model.get_image_features(pixels, grid)
        assert tokens.shape[0] == cells * (cells + 1) + 1 + rows * cells * (cols * cells + 1)
        sub = model.vision_proj(model.plora_sub_GN.view(1, -1))
        glb = model.vision_proj(model.plora_glb_GN.view(1, -1))
        detail_start, stride = cells * (cells + 1) + 1, cols * cells + 1
        assert torch.allclose(tokens[detail_start - 1], glb[0])
        for row in range(cells):
            assert torch.allclose(tokens[row * (cells + 1) + cells], sub[0])
        for row in range(rows * cells):
            assert torch.allclose(tokens[detail_start + row * stride + stride - 1], sub[0])
        crop = 5  # row 1, col 2 of the 2 × 3 crop grid (view 0 is the global view)
        changed = pixels.clone()
        changed[1 + crop] += 1.0
        (moved,) = model.get_image_features(changed, grid)
    diff = (moved - tokens).abs().amax(-1) > 1e-6
    expected = {detail_start + (1 * cells + r) * stride + 2 * cells + c for r in range(cells) for c in range(cells)}
    assert set(torch.nonzero(diff).flatten().tolist()) == expected


# ----- the whole model through its adapter ---------------------------------------------------------------
@pytest.fixture
def xc25():
    from miadpo.models import build_adapter

    torch.manual_seed(0)
    adapter = build_adapter(model_cfg("tiny_internlm_xc25"))
    adapter.model.eval()
    return adapter


def pictures(n: int) -> list[Image.Image]:
    return zoo_images(n, seed=n)  # the zoo's wide / tall / square sizes


def question(n: int) -> str:
    return "".join(f"Image{k} <image>; " for k in range(1, n + 1)) + "Which image is red?"


def test_image_tokens_render_as_image_here_and_the_separators_are_image_positions(xc25) -> None:
    sample = xc25.encode(pictures(2), question(2), "Image1.")
    text = "".join(xc25.tokenizer.decode(sample.input_ids[: sample.prompt_length]).split())  # tiny BPE adds spaces
    assert text.startswith("<s>[UNUSED_TOKEN_146]userImage1<ImageHere><ImageHere>")
    assert text.endswith("Whichimageisred?[UNUSED_TOKEN_145][UNUSED_TOKEN_146]assistant")
    im_mask = sample.input_ids == xc25.image_token_id
    # Every position of every span (global rows, sub_GN, glb_GN, crops) is an image position: Partial-LoRA there.
    for (start, end), geometry in zip(sample.image_spans, sample.geometries):
        assert im_mask[start:end].all() and geometry.num_tokens == end - start
        rows, cols = geometry.layout
        assert end - start == 4 * (rows * cols + 1) + 1 + 2 * (rows + 1)
    assert int(im_mask.sum()) == sum(end - start for start, end in sample.image_spans)


def test_partial_lora_changes_the_model_only_from_the_first_image_token_on(xc25) -> None:
    sample = xc25.encode(pictures(2), question(2), "Image1.")
    batch = xc25.collate([sample])
    model = xc25.base_model
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "Plora_B" in name:
                parameter.normal_(std=0.05)
        with_plora = model(**batch).logits[0]
        for name, parameter in model.named_parameters():
            if "Plora_B" in name:
                parameter.zero_()
        without = model(**batch).logits[0]
    changed = (with_plora - without).abs().amax(-1) > 1e-6
    first = sample.image_spans[0][0]
    assert not changed[:first].any() and changed[first:].all()


def test_cached_generation_equals_full_recomputation(xc25) -> None:
    prompts = [xc25.encode(pictures(n), question(n)) for n in (1, 3)]
    batch = xc25.generation_inputs(prompts)
    with torch.no_grad():
        out = xc25.model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                  pad_token_id=xc25.tokenizer.pad_token_id)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        for _ in range(6):  # no cache: the whole sequence again at every step
            logits = xc25.model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"],
                                image_layout=batch["image_layout"]).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(out, ids)


def test_selection_capture_records_the_eager_attention_rows(xc25, monkeypatch) -> None:
    """Rows recorded while generating on SDPA = the same rows of the eager softmax at that layer."""
    import copy

    import miadpo.models.internlm_xc25.internlm2 as internlm2
    from miadpo.models import EncodedSample
    from miadpo.select.capture import AttentionRecorder, capture_attention

    prompts = [xc25.encode(pictures(n), question(n)) for n in (2, 1)]
    batch = xc25.generation_inputs(prompts)
    recorder = AttentionRecorder(prompt_mask=batch["attention_mask"])
    original = internlm2.eager_attention_forward
    with monkeypatch.context() as patch:
        patch.setattr(internlm2, "eager_attention_forward", None)  # every layer must stay on SDPA
        with capture_attention(xc25, 1, recorder), torch.no_grad():
            out = xc25.model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                      pad_token_id=xc25.tokenizer.pad_token_id)
    config = xc25.base_model.config  # the capture switched one attention module, nothing else
    assert config._attn_implementation == config.vision_config._attn_implementation == "sdpa"
    eager = copy.deepcopy(xc25.base_model)
    eager.config._attn_implementation = "eager"
    seen: dict[str, torch.Tensor] = {}

    def keep(module, *args, **kwargs):
        output, probs = original(module, *args, **kwargs)
        if module.layer_idx == 1:
            seen["probs"] = probs
        return output, probs

    width = batch["input_ids"].shape[1]
    for b, prompt in enumerate(prompts):
        answer = out[b, width:]
        full = xc25.collate([EncodedSample(torch.cat([prompt.input_ids, answer]), torch.cat([prompt.labels, answer]),
                                           prompt.image_spans, prompt.geometries, prompt.pixel_values,
                                           prompt.prompt_length, prompt.extra)])
        full.pop("labels")
        with monkeypatch.context() as patch, torch.no_grad():
            patch.setattr(internlm2, "eager_attention_forward", keep)
            eager(**full)
        start = prompt.prompt_length - 1
        columns = torch.cat([torch.arange(s, e) for s, e in prompt.image_spans])
        expected = seen["probs"][0, :, start : start + 4][:, :, columns].mean(0)
        padding = width - prompt.input_ids.numel()  # the recorder counts in left-padded coordinates
        captured = recorder.rows(b, 4, columns + padding)
        assert torch.allclose(captured, expected, atol=1e-5)


def test_an_unsupported_attention_implementation_fails_at_build_time() -> None:
    from conftest import model_config

    from miadpo.models import build_adapter

    with pytest.raises(ValueError, match="sdpa or eager for InternLM-XC2.5, not 'flash_attention_2'"):
        build_adapter(model_config(name="tiny_internlm_xc25", family="internlm_xc25", template="internlm_xc25",
                                   attn_implementation="flash_attention_2"))


def test_dynamic_ntk_grows_the_rotary_base_only_beyond_the_trained_length() -> None:
    from miadpo.models.internlm_xc25.internlm2 import InternLM2Model

    model = InternLM2Model(tiny_config(max_position_embeddings=100, rotary_dynamic_factor=2.0))
    assert model.rope_base(100) == 10000.0
    d = 8  # head dim of the tiny config
    assert model.rope_base(200) == pytest.approx(10000.0 * (2.0 * 200 / 100 - 1.0) ** (d / (d - 2)))
    assert InternLM2Model(tiny_config(max_position_embeddings=100, rotary_dynamic_factor=None)).rope_base(200) == 1e4


# ----- loading the official checkpoint layout ------------------------------------------------------------
TASK_LORAS = {"sft": 6, "dpo": 6, "web": 12}  # the released checkpoint's ranks are 256, 256, 512


def official_checkpoint(directory, tower_prefix: str = "vit.vision_tower.vision_model.", rename=None,
                        positions: int | None = None, extra: dict | None = None):
    """A synthetic checkpoint with the official names (CLIP under ``vision_model.``), the task LoRAs of every
    Partial-LoRA linear (``lora_sft/dpo/web_A/B``, unused by our model) and config.json."""
    import json

    from safetensors.torch import save_file

    from miadpo.models.internlm_xc25.checkpoint import TOWER_PREFIXES
    from miadpo.models.internlm_xc25.modeling import InternLMXComposer2ForCausalLM

    torch.manual_seed(1)
    model = InternLMXComposer2ForCausalLM(tiny_config(vocab_size=64, image_placeholder_id=64))
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(TOWER_PREFIXES[1]) and not name.startswith(TOWER_PREFIXES[0]):
            name = tower_prefix + name[len(TOWER_PREFIXES[1]):]
        tensors[(rename or {}).get(name, name)] = tensor.clone()
    for name, module in model.named_modules():
        if hasattr(module, "Plora_A"):
            for task, rank in TASK_LORAS.items():
                tensors[f"{name}.lora_{task}_A.weight"] = torch.randn(rank, module.in_features)
                tensors[f"{name}.lora_{task}_B.weight"] = torch.randn(module.out_features, rank)
    tensors.update(extra or {})
    if positions is not None:
        key = next(k for k in tensors if k.endswith("embeddings.position_embedding.weight"))
        tensors[key] = torch.randn(positions, tensors[key].shape[1])
    directory.mkdir()
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[: len(names) // 2]}, directory / "model-00001-of-00002.safetensors")
    save_file({k: tensors[k] for k in names[len(names) // 2 :]}, directory / "model-00002-of-00002.safetensors")
    (directory / "config.json").write_text(json.dumps({
        "model_type": "internlmxcomposer2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "rope_scaling": {"type": "dynamic", "factor": 2.0},
        "max_position_embeddings": 24576}))
    return model, tensors


def test_official_names_load_with_nothing_missing_or_unexpected(tmp_path, monkeypatch) -> None:
    from miadpo.models.internlm_xc25 import checkpoint

    monkeypatch.setattr(checkpoint, "CLIP_L14_560", tiny_config().vision_config.to_dict())
    source, tensors = official_checkpoint(tmp_path / "official")
    assert any(name.startswith("vit.vision_tower.vision_model.") for name in tensors)
    # the tables cover every name: loaded, or known and unused (the task LoRAs)
    assert all(checkpoint.is_checkpoint_name(n) or checkpoint.unused_tensor_owner(n) for n in tensors)
    model = checkpoint.load_model(tmp_path / "official", dtype=torch.float32)
    assert model.config.plora_r == 4 and model.config.rotary_dynamic_factor == 2.0  # rank read off the tensors
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, source.eval()(input_ids=ids).logits)


def test_task_loras_of_the_release_are_skipped_and_counted_never_unknown_names(tmp_path, monkeypatch, caplog) -> None:
    from miadpo.models.internlm_xc25 import checkpoint
    from miadpo.models.internlm_xc25.modeling import InternLMXComposer2ForCausalLM

    monkeypatch.setattr(checkpoint, "CLIP_L14_560", tiny_config().vision_config.to_dict())
    _, tensors = official_checkpoint(tmp_path / "official")
    task_names = sorted(n for n in tensors if ".lora_" in n)
    assert len(task_names) == 60  # 2 layers × 5 Partial-LoRA linears × (sft, dpo, web) × (A, B)
    model = InternLMXComposer2ForCausalLM(checkpoint.load_config(tmp_path / "official"))
    with caplog.at_level("DEBUG", logger=checkpoint.__name__):
        report = checkpoint.load_checkpoint(model, tmp_path / "official")
    assert sorted(report.skipped) == task_names
    assert report.loaded == len(model.state_dict())
    assert "skipped 60 task-LoRA tensors" in caplog.text
    assert "model.layers.0.attention.wo.lora_dpo_A.weight" in caplog.text  # the names, at debug level
    # a task LoRA of a linear the model lacks, or an unknown adapter name, is still an error
    for name in ("model.layers.7.attention.wo.lora_dpo_A.weight", "model.layers.0.attention.wo.lora_foo_A.weight"):
        official_checkpoint(tmp_path / name, extra={name: torch.zeros(6, 32)})
        with pytest.raises(checkpoint.CheckpointMismatchError, match=f"unexpected in the checkpoint \\(1\\): {name}"):
            checkpoint.load_model(tmp_path / name, dtype=torch.float32)


def test_a_renamed_or_reshaped_tensor_is_reported_by_name(tmp_path, monkeypatch) -> None:
    from miadpo.models.internlm_xc25 import checkpoint

    monkeypatch.setattr(checkpoint, "CLIP_L14_560", tiny_config().vision_config.to_dict())
    official_checkpoint(tmp_path / "renamed", rename={"output.weight": "lm_head.weight"})
    with pytest.raises(checkpoint.CheckpointMismatchError) as info:
        checkpoint.load_model(tmp_path / "renamed", dtype=torch.float32)
    message = str(info.value)
    assert "missing from the checkpoint (1): output.weight" in message
    assert "unexpected in the checkpoint (1): lm_head.weight" in message
    official_checkpoint(tmp_path / "reshaped", rename={"model.norm.weight": "model.layers.0.ffn_norm.weight"})
    with pytest.raises(checkpoint.CheckpointMismatchError, match="missing from the checkpoint \\(1\\): model.norm"):
        checkpoint.load_model(tmp_path / "reshaped", dtype=torch.float32)


def test_position_embeddings_of_another_resolution_are_interpolated(tmp_path, monkeypatch) -> None:
    from miadpo.models.internlm_xc25 import checkpoint

    monkeypatch.setattr(checkpoint, "CLIP_L14_560", tiny_config().vision_config.to_dict())
    _, tensors = official_checkpoint(tmp_path / "small", positions=1 + 2 * 2)  # a 2 × 2 grid; the tower has 4 × 4
    model = checkpoint.load_model(tmp_path / "small", dtype=torch.float32)
    table = next(t for n, t in model.state_dict().items() if n.endswith("embeddings.position_embedding.weight"))
    source = tensors["vit.vision_tower.vision_model.embeddings.position_embedding.weight"]
    assert table.shape == (17, 16) and torch.equal(table[0], source[0])
    grid = table[1:].view(4, 4, 16)
    assert torch.allclose(grid.mean((0, 1)), source[1:].mean(0), atol=0.5)  # a resize, not a copy or zeros
    assert checkpoint.interpolate_positions(source, 5).equal(source)


def test_saved_model_reloads_through_the_same_checked_loader(xc25, tmp_path) -> None:
    from miadpo.models.internlm_xc25.checkpoint import load_model

    xc25.save_base(tmp_path / "saved")
    reloaded = load_model(tmp_path / "saved", dtype=torch.float32)
    assert reloaded.state_dict().keys() == xc25.base_model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), xc25.base_model.state_dict().values()))


@pytest.mark.slow
def test_train_entry_runs_three_steps_on_grid_data(tmp_path) -> None:
    """``python -m miadpo.train model=tiny_internlm_xc25 data=grid trainer.max_steps=3`` as a user runs it
    (augment → select with attention capture → DPO), on a small LLaVA-format source."""
    import subprocess
    import sys

    from conftest import REPO
    from test_augment import write_source

    source = write_source(tmp_path, n_generated=8)
    command = [sys.executable, "-m", "miadpo.train", "model=tiny_internlm_xc25", "data=grid", "trainer.max_steps=3",
               f"data.source={source}", f"data.image_root={tmp_path / 'images'}", f"data.out_dir={tmp_path / 'data'}",
               f"run_dir={tmp_path / 'run'}", "logger=csv", "data.batch_size=2", "data.num_workers=0",
               "data.val_fraction=0", "data.max_bad_fraction=0.5", "selection.generation.max_new_tokens=6",
               "selection.thresholds.grid={2:1,3:1,4:1,5:1,6:1,7:1,8:1,9:1}", "selection.min_perplexity=0",
               "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'hydra'}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["global_step"] == 3
    pairs = list((tmp_path / "data").glob("selection/*/pairs-*/pairs.jsonl"))
    assert pairs and pairs[0].read_text().strip()
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


# ----- python -m miadpo.models.verify ------------------------------------------------------------------------
class OriginalInterface(torch.nn.Module):
    """Stand-in for the checkpoint's remote-code class, with its interface: ``vit(canvases, glb_GN, sub_GN)``
    → (pre-projection features, lengths), ``vision_proj``, ``model(inputs_embeds, attention_mask, im_mask)`` →
    output with ``last_hidden_state``, ``output``. Built on our modules (no remote code can run here)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.inner = model
        self.vision_proj, self.output = model.vision_proj, model.output
        self.plora_glb_GN, self.plora_sub_GN = model.plora_glb_GN, model.plora_sub_GN
        self.model = self.Decoder(model.model)

    class Decoder(torch.nn.Module):
        def __init__(self, decoder) -> None:
            super().__init__()
            self.decoder = decoder

        def forward(self, inputs_embeds, attention_mask, im_mask):
            from types import SimpleNamespace

            return SimpleNamespace(last_hidden_state=self.decoder(inputs_embeds, attention_mask, im_mask))

    def vit(self, canvases, glb_gn, sub_gn):
        from miadpo.models.internlm_xc25.hd import HDLayout, hd_views
        from miadpo.models.internlm_xc25.vision import layout_tokens, merge_2x2

        crop = self.inner.config.vision_config.image_size
        out = []
        for canvas in canvases:
            height, width = canvas.shape[-2:]
            layout = HDLayout((width, height), (width, height), (width, height), height // crop, width // crop, crop,
                              crop // self.inner.config.vision_config.patch_size // 2)
            merged = merge_2x2(self.inner.vit(hd_views(canvas[0], layout)))
            out.append(layout_tokens(merged, layout.rows, layout.cols, sub_gn, glb_gn))
        return torch.cat(out)[None], [len(t) for t in out]


def verify_config(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    from miadpo.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="verify", overrides=["model=tiny_internlm_xc25", "max_new_tokens=4",
                                                        f"report={tmp_path / 'report.json'}", *overrides])


def test_verify_compares_with_the_original_interface_and_catches_a_difference(tmp_path) -> None:
    from miadpo.models import build_adapter
    from miadpo.models.verify import verify

    cfg = verify_config(tmp_path)
    reference = OriginalInterface(build_adapter(cfg.model).base_model.eval())
    result = verify(cfg, reference=reference)
    assert result["image_features_max_abs_diff"] < 1e-5 and result["logits_max_abs_diff"] < 1e-4
    # Two images → hd_num_multi 6: 960 × 540 → 3 × 28 px wide, 2 rows; 480 × 800 → 2 cols, 3 rows. 2 × 2 cells per
    # crop: 4·(6 + 1) + 1 + 2·(2 + 1) = 35 and 4·(6 + 1) + 1 + 2·(3 + 1) = 37 tokens.
    assert result["match"] and result["image_tokens"] == [35, 37]
    with torch.no_grad():
        reference.output.weight[:, :5] += 0.5
        reference.plora_sub_GN += 0.5
    result = verify(cfg, reference=reference)
    assert result["logits_max_abs_diff"] > 0.01 and result["image_features_max_abs_diff"] > 0.01
    assert not result["match"]
    assert json.loads((tmp_path / "report.json").read_text())["match"] is False


@pytest.mark.slow
def test_verify_entry_on_a_saved_directory_reports_why_there_is_no_reference(xc25, tmp_path) -> None:
    import subprocess
    import sys

    from conftest import REPO

    xc25.save_base(tmp_path / "weights")
    command = [sys.executable, "-m", "miadpo.models.verify", "model=tiny_internlm_xc25",
               f"model.path={tmp_path / 'weights'}", "max_new_tokens=4", f"report={tmp_path / 'report.json'}",
               f"hydra.run.dir={tmp_path / 'hydra'}", "model.trust_remote_code=true"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["reference"].startswith("original remote code not usable here")
    assert "answer" in done.stdout and "match" not in report


def test_the_paper_run_shape_composes_and_validates() -> None:
    from hydra import compose, initialize_config_dir

    from miadpo.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=mia_dpo_internlm_xc25"])
    assert (cfg.model.name, cfg.model.path, cfg.model.template) == (
        "internlm_xc25", "internlm/internlm-xcomposer2d5-7b", "internlm_xc25")
    assert dict(cfg.data.formats) == {"sequence": 1.0, "grid": 1.0, "pip": 1.0}
    assert (cfg.dpo.loss, cfg.dpo.beta, cfg.dpo.sft_weight, cfg.optim.lr, cfg.trainer.max_epochs) == (
        "sigmoid", 0.1, 0.0, 5e-5, 3)
    effective_batch = cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.accumulate_grad_batches
    assert effective_batch == 64 and cfg.strategy.stage == 2 and cfg.trainer.precision == "bf16-mixed"


CORPUS = ["the red square is left of the blue disc", "which image shows a green triangle", "answer briefly",
          "image one has two cats and image two has a dog", "what colour is the shape in the second picture"] * 20


def sentencepiece_weights_directory(directory, vocab_size: int = 64):
    """``tokenizer.model`` trained here (InternLM2's ids: unk 0, <s> 1, </s> 2; chat markers as user-defined
    pieces), the official tokenizer_config.json, and a remote-code file that records being imported."""
    import io

    import sentencepiece as spm

    from miadpo.models.internlm_xc25.adapter import CHAT_TOKENS

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=vocab_size,
                                   model_type="bpe", user_defined_symbols=CHAT_TOKENS, character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    directory.mkdir(exist_ok=True)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "tokenizer_class": "InternLM2Tokenizer", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}))
    (directory / "tokenization_internlm2.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('EXECUTED').write_text('remote code ran')\n")
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def test_the_internlm2_tokenizer_is_read_from_tokenizer_model_without_running_its_code(tmp_path) -> None:
    from miadpo.models.internlm_xc25.adapter import CHAT_TOKENS, IMAGE_HERE, checkpoint_tokenizer

    sp = sentencepiece_weights_directory(tmp_path)
    tokenizer = checkpoint_tokenizer(tmp_path, image_token_id=sp.get_piece_size())
    assert not (tmp_path / "EXECUTED").exists()
    for text in ["which image shows a green triangle", "the red disc,  and   two cats?",
                 f"{CHAT_TOKENS[1]}user\nanswer briefly{CHAT_TOKENS[0]}\n{CHAT_TOKENS[1]}assistant\n"]:
        assert tokenizer(text)["input_ids"] == [1, *sp.encode(text)]  # <s> + SentencePiece, as the original
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    assert [tokenizer.convert_tokens_to_ids(t) for t in CHAT_TOKENS] == [sp.piece_to_id(t) for t in CHAT_TOKENS]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token) == (1, 2, "</s>")
    ids = tokenizer(f"image one{IMAGE_HERE}{IMAGE_HERE}a dog", add_special_tokens=False)["input_ids"]
    assert ids == [*sp.encode("image one"), sp.get_piece_size(), sp.get_piece_size(), *sp.encode("a dog")]
    assert tokenizer.decode(sp.encode("which image shows a green triangle")) == "which image shows a green triangle"
    tokenizer.save_pretrained(tmp_path / "saved")  # our own save reloads the same way
    again = checkpoint_tokenizer(tmp_path / "saved", image_token_id=sp.get_piece_size())
    chat = f"{CHAT_TOKENS[1]}user\nanswer{IMAGE_HERE} briefly"
    assert again(chat)["input_ids"] == tokenizer(chat)["input_ids"]


def test_added_tokens_of_the_tokenizer_config_are_split_first_at_their_ids(tmp_path) -> None:
    """As transformers' slow tokenizer (the original's base) treats ``added_tokens_decoder``: never split, the
    text around them encoded on its own."""
    from miadpo.models.internlm_xc25.adapter import CHAT_TOKENS, checkpoint_tokenizer

    sp = sentencepiece_weights_directory(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {str(sp.piece_to_id(t)): {"content": t, "special": True} for t in CHAT_TOKENS}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = checkpoint_tokenizer(tmp_path, image_token_id=sp.get_piece_size())
    end, start = (sp.piece_to_id(t) for t in CHAT_TOKENS)
    assert tokenizer(f"{CHAT_TOKENS[1]}user answer briefly{CHAT_TOKENS[0]}")["input_ids"] == [
        1, start, *sp.encode("user answer briefly"), end]
    config["added_tokens_decoder"] = {"7": {"content": "<extra>", "special": True}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="recorded at id 7 but gets id 64"):
        checkpoint_tokenizer(tmp_path, image_token_id=sp.get_piece_size())


def test_the_official_checkpoint_loads_with_remote_code_off(tmp_path, monkeypatch) -> None:
    """``model=internlm_xc25`` on a weights directory in the official layout, ``trust_remote_code=false``."""
    from miadpo.models import build_adapter
    from miadpo.models.internlm_xc25 import checkpoint

    monkeypatch.setattr(checkpoint, "CLIP_L14_560", tiny_config().vision_config.to_dict())
    official_checkpoint(tmp_path / "official")
    sentencepiece_weights_directory(tmp_path / "official", vocab_size=64)
    cfg = model_cfg("internlm_xc25")
    cfg.path, cfg.trust_remote_code, cfg.dtype, cfg.lora.enabled = str(tmp_path / "official"), False, "float32", False
    adapter = build_adapter(cfg)
    assert not (tmp_path / "official" / "EXECUTED").exists()
    sample = adapter.encode(zoo_images(2), "Image1 <image>; Image2 <image>; which image shows a dog?", "the first")
    plans = adapter.plan_images([im.size for im in zoo_images(2)])
    assert int((sample.input_ids == 64).sum()) == sum(plan.num_tokens for plan in plans)


def test_a_checkpoint_tokenizer_gets_image_here_after_its_vocabulary(tmp_path) -> None:
    from miadpo.models.internlm_xc25.adapter import CHAT_TOKENS, checkpoint_tokenizer
    from miadpo.models.tiny import build_tiny_tokenizer

    plain = build_tiny_tokenizer(300, ["<unk>", "<s>", "</s>", *CHAT_TOKENS], named={"pad_token": None}, extra={})
    plain.save_pretrained(tmp_path)
    tokenizer = checkpoint_tokenizer(tmp_path, image_token_id=len(plain))
    assert tokenizer.convert_tokens_to_ids("<ImageHere>") == len(plain) and tokenizer.pad_token is not None
    ids = tokenizer("a<ImageHere><ImageHere>b", add_special_tokens=False)["input_ids"]
    assert ids.count(len(plain)) == 2
    with pytest.raises(ValueError, match="expects 7"):
        checkpoint_tokenizer(tmp_path, image_token_id=7)


def test_the_default_config_has_the_checkpoint_shapes_of_the_7b_model() -> None:
    """Built on the meta device (no memory): InternLM2-7B with GQA 32/8, Partial-LoRA rank 256, CLIP-L/14 at
    560 px (1 + 40² positions), 4096-wide separators and projector, untied 92,544-token head."""
    from miadpo.models.internlm_xc25.checkpoint import is_checkpoint_name
    from miadpo.models.internlm_xc25.modeling import InternLMXComposer2Config, InternLMXComposer2ForCausalLM

    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in InternLMXComposer2ForCausalLM(InternLMXComposer2Config())
                  .state_dict().items()}
    layer = "model.layers.31."
    expected = {
        "model.tok_embeddings.weight": (92544, 4096), "output.weight": (92544, 4096),
        f"{layer}attention.wqkv.weight": ((32 + 2 * 8) * 128, 4096), f"{layer}attention.wo.weight": (4096, 4096),
        f"{layer}attention.wqkv.Plora_A.weight": (256, 4096), f"{layer}attention.wqkv.Plora_B.weight": (6144, 256),
        f"{layer}feed_forward.w1.weight": (14336, 4096), f"{layer}feed_forward.w2.weight": (4096, 14336),
        f"{layer}feed_forward.w2.Plora_A.weight": (256, 14336), f"{layer}ffn_norm.weight": (4096,),
        "vision_proj.0.weight": (4096, 4096), "vision_proj.2.weight": (4096, 4096),
        "plora_glb_GN": (1, 1, 4096), "plora_sub_GN": (1, 1, 1, 4096),
    }
    assert {name: shapes[name] for name in expected} == expected
    positions = next(shape for name, shape in shapes.items() if name.endswith("position_embedding.weight"))
    assert positions == (1 + 40 * 40, 1024)
    assert "model.layers.32.ffn_norm.weight" not in shapes and all(is_checkpoint_name(n) for n in shapes)
