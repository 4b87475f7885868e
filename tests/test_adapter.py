"""The model adapter contract on tiny LLaVA: spans, geometry, labels, token counts, truncation, loading."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PROMPT_HEADERS, colour_image, compose_train

from miadpo.models import IGNORE_INDEX, ModelWeightsNotFoundError, SampleTooLongError, build_adapter


def images_for(n: int) -> list:
    sizes = [(56, 56), (112, 56), (40, 90), (64, 64), (30, 20)]
    return [colour_image(sizes[k], (30 * k, 200 - 30 * k, 90)) for k in range(n)]


@pytest.mark.parametrize("n_images", [1, 3, 5])
def test_perturbing_image_i_changes_embeddings_only_inside_its_span(adapter, n_images: int) -> None:
    prompt = PROMPT_HEADERS[n_images] + "In Image1, what colour is the square?"
    images = images_for(n_images)
    base = adapter.encode(images, prompt, "The square is red.")
    assert len(base.image_spans) == n_images
    reference = adapter.input_embeddings(adapter.collate([base]))[0]
    for i in range(n_images):
        perturbed = list(images)
        perturbed[i] = colour_image(images[i].size, (255, 255, 0))
        sample = adapter.encode(perturbed, prompt, "The square is red.")
        assert torch.equal(sample.input_ids, base.input_ids)
        embeds = adapter.input_embeddings(adapter.collate([sample]))[0]
        changed = set((embeds - reference).abs().amax(-1).gt(1e-6).nonzero().flatten().tolist())
        start, end = base.image_spans[i]
        assert changed == set(range(start, end)), f"image {i + 1}"


def test_spans_hold_exactly_the_image_tokens(adapter) -> None:
    sample = adapter.encode(images_for(3), PROMPT_HEADERS[3] + "Which?", "That one.")
    positions = (sample.input_ids == adapter.image_token_id).nonzero().flatten().tolist()
    assert positions == [p for s, e in sample.image_spans for p in range(s, e)]
    assert all(e - s == 16 for s, e in sample.image_spans)  # (56 / 14)² patches, CLS dropped


def test_labels_mask_everything_but_the_answer(adapter) -> None:
    sample = adapter.encode(images_for(2), PROMPT_HEADERS[2] + "In Image2, what colour?", "It is green.")
    answer_ids = sample.input_ids[sample.labels != IGNORE_INDEX]
    assert sample.labels[: sample.prompt_length].eq(IGNORE_INDEX).all()
    assert adapter.tokenizer.decode(answer_ids) == " It is green.</s>"
    assert answer_ids.numel() == sample.answer_length


@pytest.mark.parametrize("n_images", [1, 2, 5])
def test_count_tokens_agrees_with_encode(adapter, n_images: int) -> None:
    images = images_for(n_images)
    prompt = PROMPT_HEADERS[n_images] + "In Image1, describe the picture in detail."
    sample = adapter.encode(images, prompt, "A long answer with several words.")
    assert adapter.count_tokens(prompt, "A long answer with several words.", [im.size for im in images]) == (
        sample.prompt_length, sample.answer_length)


def test_truncation_cuts_the_answer_never_the_images(adapter) -> None:
    images, prompt, answer = images_for(3), PROMPT_HEADERS[3] + "Q?", "one two three four five six seven"
    full = adapter.encode(images, prompt, answer)
    cut = adapter.encode(images, prompt, answer, max_length=full.prompt_length + 2)
    assert cut.input_ids.numel() == full.prompt_length + 2 and cut.answer_length == 2
    assert cut.image_spans == full.image_spans
    assert torch.equal(cut.input_ids, full.input_ids[: full.prompt_length + 2])
    with pytest.raises(SampleTooLongError, match="max_length"):
        adapter.encode(images, prompt, answer, max_length=full.prompt_length)


# Cells of the tiny model: 56 px input, 14 px patches → a 4 × 4 token grid.
@pytest.mark.parametrize(
    ("size", "box", "pad", "cells"),
    [
        ((56, 56), (0, 0, 28, 28), True, [(0, 0), (0, 1), (1, 0), (1, 1)]),
        ((112, 112), (56, 84, 112, 112), True, [(3, 2), (3, 3)]),
        # 112 × 56 padded to 112 × 112 (image at y 28..84), scaled by 1/2: y 14..42 → rows 1, 2.
        ((112, 56), (0, 0, 56, 56), True, [(1, 0), (1, 1), (2, 0), (2, 1)]),
        # 40 × 80 padded to 80 × 80 (image at x 20..60), scaled by 0.7: x 14..42 → cols 1, 2; y 0..14 → row 0.
        ((40, 80), (0, 0, 40, 20), True, [(0, 1), (0, 2)]),
        # no padding: 112 × 56 resized to 112 × 56, centre crop x 28..84: x 28..56 → cols 0, 1.
        ((112, 56), (28, 0, 56, 56), False, [(r, c) for r in range(4) for c in (0, 1)]),
    ],
)
def test_pixel_box_maps_to_expected_cells(make_adapter, size, box, pad, cells) -> None:
    adapter = make_adapter(pad_to_square=pad)
    geometry = adapter.process_images([colour_image(size, (255, 255, 255))]).geometries[0]
    mask = geometry.token_mask(box).reshape(4, 4)
    assert sorted(zip(*np.nonzero(mask))) == sorted(cells)


@pytest.mark.parametrize(
    ("size", "box", "pad"),
    [((112, 56), (0, 0, 56, 56), True), ((112, 56), (28, 0, 56, 56), False), ((40, 80), (0, 0, 40, 20), True),
     ((56, 56), (14, 28, 42, 56), True)],
)
def test_geometry_follows_the_real_preprocessing(make_adapter, size, box, pad) -> None:
    """Paint the box, run the adapter's preprocessing, and find which patches changed."""
    adapter = make_adapter(pad_to_square=pad)
    blank = colour_image(size, (255, 255, 255))
    painted = blank.copy()
    painted.paste((200, 0, 0), tuple(int(v) for v in box))
    processed = adapter.process_images([blank, painted])
    diff = (processed.pixel_values[1] - processed.pixel_values[0]).abs().mean(0)  # (56, 56)
    per_patch = diff.reshape(4, 14, 4, 14).mean(dim=(1, 3))
    changed = per_patch > 0.5 * per_patch.max()
    expected = processed.geometries[1].token_mask(box).reshape(4, 4)
    assert changed.numpy().tolist() == expected.tolist()


def test_tiny_model_reloads_from_a_saved_directory(adapter, make_adapter, tmp_path: Path) -> None:
    adapter.save_base(tmp_path / "base")
    reloaded = make_adapter(path=str(tmp_path / "base"))
    sample = adapter.encode(images_for(2), PROMPT_HEADERS[2] + "What?", "Blue.")
    again = reloaded.encode(images_for(2), PROMPT_HEADERS[2] + "What?", "Blue.")
    assert torch.equal(sample.input_ids, again.input_ids)
    assert torch.allclose(sample.pixel_values, again.pixel_values)
    with torch.no_grad():
        a = adapter.model(**adapter.collate([sample])).logits
        b = reloaded.model(**reloaded.collate([again])).logits
    assert torch.allclose(a, b, atol=1e-6)


def test_llava15_without_weights_fails_with_instructions(tmp_path: Path) -> None:
    cfg = compose_train(["model=llava15"], tmp_path)
    with pytest.raises(ModelWeightsNotFoundError) as info:
        build_adapter(cfg.model)
    message = str(info.value)
    assert "llava-hf/llava-1.5-7b-hf" in message and "model.path=" in message and "allow_download" in message


def test_default_lora_targets_every_llm_linear_but_not_lm_head(adapter) -> None:
    adapter.prepare_for_training()
    names = [n for n, _ in adapter.model.named_modules() if n.endswith("lora_A")]
    assert len(names) == 2 * 7  # 2 layers × (q, k, v, o, gate, up, down)
    assert all("language_model" in n for n in names)
    trainable = [n for n, p in adapter.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
