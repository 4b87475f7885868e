"""The same checks on every adapter of the model zoo, each on its tiny in-code configuration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_train
from hydra import compose, initialize_config_dir
from peft import PeftModel
from PIL import Image
from reliability import case

from miadpo.config import DPOConfig, OptimConfig
from miadpo.data.dataset import EncodedPair
from miadpo.dpo.forward import ConcatenatedPairForward
from miadpo.dpo.module import DPOModule
from miadpo.models import IGNORE_INDEX, ModelAdapter, ModelWeightsNotFoundError, SampleTooLongError, build_adapter
from miadpo.train import CONFIG_DIR, train

QWEN3 = ["tiny_qwen3_vl", "tiny_qwen3_vl_moe", "tiny_qwen3_5", "tiny_qwen3_5_moe"]
GLM = ["tiny_glm4v", "tiny_glm4v_moe", "tiny_glm46v"]
ZOO = ["tiny_llava", "tiny_qwen2_vl", "tiny_qwen2_5_vl", "tiny_idefics3", "tiny_smolvlm", "tiny_internvl",
       "tiny_llava_onevision", "tiny_internlm_xc25", *QWEN3, "tiny_internvl3_5", "tiny_gemma3", "tiny_gemma4", *GLM,
       "tiny_minicpm_v4_6"]
REAL = {"qwen2_vl": "Qwen/Qwen2-VL-7B-Instruct", "qwen2_5_vl": "Qwen/Qwen2.5-VL-7B-Instruct",
        "qwen3_vl": "Qwen/Qwen3-VL-8B-Instruct", "qwen3_vl_moe": "Qwen/Qwen3-VL-30B-A3B-Instruct",
        "qwen3_5": "Qwen/Qwen3.5-9B", "qwen3_5_moe": "Qwen/Qwen3.5-35B-A3B",
        "internvl3_5": "OpenGVLab/InternVL3_5-8B-HF", "gemma3": "google/gemma-3-4b-it",
        "glm4_1v": "zai-org/GLM-4.1V-9B-Thinking", "glm4_5v": "zai-org/GLM-4.5V",
        "glm4_6v_flash": "zai-org/GLM-4.6V-Flash", "gemma4": "google/gemma-4-E4B-it",
        "minicpm_v4_6": "openbmb/MiniCPM-V-4.6",
        "idefics3": "HuggingFaceM4/Idefics3-8B-Llama3", "smolvlm": "HuggingFaceTB/SmolVLM-Instruct",
        "internvl": "OpenGVLab/InternVL3-8B-hf", "llava_onevision": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
        "internlm_xc25": "internlm/internlm-xcomposer2d5-7b"}
# Sizes chosen so that the dynamic models tile or resize them differently (wide, tall, square).
SIZES = [(64, 32), (40, 90), (48, 48), (90, 50), (30, 70)]


def model_cfg(name: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=[f"model={name}"]).model


@pytest.fixture(scope="module", params=ZOO)
def zoo_name(request) -> str:
    return request.param


@pytest.fixture
def zoo(zoo_name: str) -> ModelAdapter:
    torch.manual_seed(0)
    return build_adapter(model_cfg(zoo_name))


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in SIZES[:n]]


def prompt(n: int) -> str:
    return "".join(f"Image{k}: <image>\n" for k in range(1, n + 1)) + "What colour is the square in Image1?"


def test_forward_backward_with_1_3_5_images_and_a_mixed_batch(zoo: ModelAdapter) -> None:
    zoo.prepare_for_training()
    samples = [zoo.encode(images(n, seed=n), prompt(n), "It is red.") for n in (1, 3, 5)]
    for batch in [zoo.collate([s]) for s in samples] + [zoo.collate(samples)]:
        zoo.model.zero_grad()
        loss = zoo.model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        grads = [p.grad for n, p in zoo.model.named_parameters() if ".lora_" in n]
        assert grads and all(g is not None for g in grads)
        assert any(float(g.abs().sum()) > 0 for g in grads)


def test_labels_are_the_answer_and_its_end_token_only(zoo: ModelAdapter) -> None:
    sample = zoo.encode(images(2), prompt(2), "It is red.")
    answer = zoo.tokenizer("It is red.", add_special_tokens=False)["input_ids"] + [zoo.eos_token_id]
    kept = sample.labels[sample.labels != IGNORE_INDEX].tolist()
    assert kept == answer
    assert (sample.labels[: sample.prompt_length] == IGNORE_INDEX).all()


def test_count_tokens_agrees_with_encode(zoo: ModelAdapter) -> None:
    for n in (1, 2, 4):
        picture = images(n)
        sample = zoo.encode(picture, prompt(n), "Blue.")
        assert zoo.count_tokens(prompt(n), "Blue.", [im.size for im in picture]) == (
            sample.prompt_length, sample.answer_length)


@pytest.mark.parametrize("n_images", [2, 3])
def test_perturbing_image_i_changes_embeddings_only_inside_its_span(zoo: ModelAdapter, n_images: int) -> None:
    picture = images(n_images)
    base = zoo.encode(picture, prompt(n_images), "Red.")
    reference = zoo.input_embeddings(zoo.collate([base]))[0]
    for i, (start, end) in enumerate(base.image_spans):
        changed = list(picture)
        changed[i] = Image.fromarray(255 - np.asarray(picture[i]))
        embeds = zoo.input_embeddings(zoo.collate([zoo.encode(changed, prompt(n_images), "Red.")]))[0]
        moved = (embeds - reference).abs().amax(-1) > 1e-6
        inside = torch.zeros_like(moved)
        inside[start:end] = True
        assert moved[start:end].any(), f"image {i + 1}: nothing inside its span changed"
        assert not moved[~inside].any(), f"image {i + 1}: embeddings outside its span changed"
        grid_positions = np.concatenate([g.token_positions().ravel() for g in base.geometries[i].grids])
        assert moved[start + torch.as_tensor(grid_positions)].all(), "a grid token did not change"


def test_spans_cover_exactly_the_image_tokens(zoo: ModelAdapter) -> None:
    sample = zoo.encode(images(3), prompt(3), "Red.")
    is_image = sample.input_ids == zoo.image_token_id
    covered = torch.zeros_like(is_image)
    for (start, end), geometry in zip(sample.image_spans, sample.geometries):
        covered[start:end] = True
        assert int(is_image[start:end].sum()) == geometry.image_token_ids
        positions = np.concatenate([g.token_positions().ravel() for g in geometry.grids])
        assert is_image[start + torch.as_tensor(positions)].all(), "a grid cell points at a non-image token"
    assert not (is_image & ~covered).any()


def test_truncation_cuts_the_answer_never_the_images(zoo: ModelAdapter) -> None:
    picture = images(2)
    full = zoo.encode(picture, prompt(2), "The square is red and large.")
    cut = zoo.encode(picture, prompt(2), "The square is red and large.", max_length=full.prompt_length + 2)
    assert cut.prompt_length == full.prompt_length and cut.answer_length == 2
    assert cut.image_spans == full.image_spans
    with pytest.raises(SampleTooLongError):
        zoo.encode(picture, prompt(2), "Red.", max_length=full.prompt_length - 1)
    # Position ids (mRoPE for Qwen) stay right: the cut sequence's logits equal the full sequence's prefix.
    with torch.no_grad():
        long = zoo.model(**zoo.collate([full])).logits[0, : cut.input_ids.numel()]
        short = zoo.model(**zoo.collate([cut])).logits[0]
    assert torch.allclose(long, short, atol=1e-5)


def test_right_and_left_padding_give_the_same_answer_logits(zoo: ModelAdapter) -> None:
    long = zoo.encode(images(3), prompt(3), "Red.")
    short = zoo.encode(images(1), prompt(1), "Red.")
    with torch.no_grad():
        alone = zoo.model(**zoo.collate([short])).logits[0]
        right = zoo.model(**zoo.collate([long, short])).logits[1, : short.input_ids.numel()]
        left = zoo.model(**zoo.collate([long, short], padding_side="left")).logits[1, -short.input_ids.numel():]
    assert torch.allclose(alone, right, atol=1e-4) and torch.allclose(alone, left, atol=1e-4)


def test_one_dpo_step_changes_the_lora_weights_and_nothing_else(zoo: ModelAdapter) -> None:
    zoo.prepare_for_training()
    module = DPOModule(zoo, DPOConfig(), OptimConfig(lr=1e-2, warmup_ratio=0.0))
    items = []
    for i, n in enumerate([1, 3]):
        processed = zoo.process_images(images(n, seed=i))
        items.append(EncodedPair(f"p{i}", zoo.encode(processed, prompt(n), "Red."),
                                 zoo.encode(processed, prompt(n), "Blue and green.")))
    batch = ConcatenatedPairForward(zoo).collate(items)
    before = {n: p.detach().clone() for n, p in zoo.model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in zoo.model.parameters() if p.requires_grad], lr=1e-2)
    optimizer.zero_grad()
    module.training_step(batch, 0).backward()
    optimizer.step()
    after = dict(zoo.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(".lora_" in n for n in changed)
    assert any(".lora_B" in n for n in changed)


def greedy_by_full_forward(zoo: ModelAdapter, inputs: dict[str, torch.Tensor], steps: int) -> list[int]:
    """Greedy decoding of one prompt without ``generate`` or a cache: a full forward pass over the prompt and the
    tokens so far for each new token, ending at the end token."""
    inputs = dict(inputs)
    length = inputs["input_ids"].shape[1]
    for _ in range(steps):
        with torch.no_grad():
            token = int(zoo.model(**inputs).logits[0, -1].argmax())
        shape = inputs["input_ids"].shape
        for key, value in inputs.items():  # per-token inputs grow by one text token (attention 1, others 0)
            if value.dim() == 2 and value.shape == shape:
                new = token if key == "input_ids" else int(key == "attention_mask")
                inputs[key] = torch.cat([value, value.new_full((1, 1), new)], dim=1)
        if token == zoo.eos_token_id:
            break
    return inputs["input_ids"][0, length:].tolist()


def test_generates_16_tokens(zoo: ModelAdapter) -> None:
    zoo.model.eval()
    prompts = [zoo.encode(images(n), prompt(n)) for n in (1, 3)]
    out = zoo.model.generate(**zoo.generation_inputs(prompts), max_new_tokens=16, min_new_tokens=16,
                             do_sample=False, pad_token_id=zoo.tokenizer.pad_token_id)
    assert out.shape[1] == zoo.generation_inputs(prompts)["input_ids"].shape[1] + 16
    # Unforced, each prompt's greedy answer is the step-by-step argmax of the model, stopping at the end token.
    for sample in prompts:
        inputs = zoo.generation_inputs([sample])
        alone = zoo.model.generate(**inputs, max_new_tokens=16, do_sample=False, eos_token_id=zoo.eos_token_id,
                                   pad_token_id=zoo.tokenizer.pad_token_id)
        produced = alone[0, inputs["input_ids"].shape[1]:].tolist()
        assert produced and produced == greedy_by_full_forward(zoo, inputs, 16)
        assert zoo.eos_token_id not in produced[:-1]


def test_saved_base_reloads_to_the_same_logits(zoo: ModelAdapter, zoo_name: str, tmp_path: Path) -> None:
    zoo.save_base(tmp_path / "base")
    cfg = model_cfg(zoo_name)
    cfg.path = str(tmp_path / "base")
    reloaded = build_adapter(cfg)
    sample = zoo.encode(images(3), prompt(3), "Red.")
    again = reloaded.encode(images(3), prompt(3), "Red.")
    assert torch.equal(sample.input_ids, again.input_ids)
    with torch.no_grad():
        a = zoo.model(**zoo.collate([sample])).logits
        b = reloaded.model(**reloaded.collate([again])).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_the_saved_chat_template_renders_miadpos_prompt_and_ids(zoo: ModelAdapter, tmp_path: Path) -> None:
    """Every family's saved tokenizer carries a chat template (transformers' ``apply_chat_template``) that renders
    the prompt miadpo trains on; each image marker expanded to the image's tokens gives miadpo's input ids."""
    from transformers import AutoTokenizer

    zoo.save_base(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "base")
    text, pictures = prompt(3), images(3)
    pieces = text.split("<image>")
    content = [{"type": "text", "text": pieces[0]}]
    for piece in pieces[1:]:
        content += [{"type": "image"}, {"type": "text", "text": piece}]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
    assert rendered == (tokenizer.bos_token or "") + zoo.template.render(text.replace("<image>",
                                                                                      zoo.chat_image_marker))
    parts = rendered.split(zoo.chat_image_marker)
    geometries = zoo.plan_images([picture.size for picture in pictures])
    expanded = parts[0] + "".join(p + part for p, part in zip(zoo.image_placeholders(geometries), parts[1:]))
    sample = zoo.encode(pictures, text)
    assert tokenizer(expanded, add_special_tokens=False)["input_ids"] == sample.input_ids.tolist()


def test_train_entry_runs_three_steps(zoo_name: str, tmp_path: Path) -> None:
    result = train(compose_train([f"model={zoo_name}", "trainer.max_steps=3", "data.synthetic.num_pairs=12",
                                  "data.batch_size=2"], tmp_path))
    assert result.global_step == 3
    assert (result.run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("name", [
    case("training", "unfinished-weights-download", "model.path is a directory with a config.json but no weight files "
         "(an empty or unfinished download)", "stops before any model loads or anything is written, naming the path, "
         "what it lacks and the download command", "gemma4"),
    "glm4_5v", "minicpm_v4_6"])
def test_an_empty_weights_directory_stops_before_loading_with_the_download_hint(name: str, tmp_path: Path,
                                                                                pair_files) -> None:
    """A ``model.path`` directory without config or weights (an unfinished download) is named with what it lacks,
    before any model loads, instead of transformers' error from deep in loading."""
    from conftest import good_record

    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "config.json").write_text("{}")
    pairs = pair_files([good_record(tmp_path, 0, 1)])
    cfg = compose_train([f"model={name}", f"model.path={tmp_path / 'weights'}", "data=pairs", f"data.pairs={pairs}",
                         f"data.image_root={tmp_path / 'images'}"], tmp_path)
    with pytest.raises(ModelWeightsNotFoundError, match=r"has no weight files .*huggingface-cli download"):
        train(cfg)
    assert not (tmp_path / "run" / "base_model").exists()


# Issue 34's families: each tiny model saved as its release lays out a weights directory, and the weights config that
# reads it (Qwen3-VL / Qwen3.5: tests/test_qwen3.py, on the released vocabularies).
WEIGHTS_CONFIG_OF = {"tiny_internvl3_5": "internvl3_5", "tiny_gemma3": "gemma3", "tiny_gemma4": "gemma4",
                     "tiny_glm4v": "glm4_1v", "tiny_minicpm_v4_6": "minicpm_v4_6",
                     "tiny_glm4v_moe": "glm4_5v", "tiny_glm46v": "glm4_6v_flash"}


@pytest.mark.parametrize("tiny_name", sorted(WEIGHTS_CONFIG_OF))
def test_weights_config_trains_two_steps_on_pairs_of_1_3_5_images(tiny_name: str, tmp_path: Path,
                                                                  pair_files) -> None:
    """``python -m miadpo.train model=<weights config> model.path=<dir>`` on a directory saved from the tiny model:
    2 steps on a pair file of 1, 3 and 5 images, through the family's own loading (tokenizer, image processor)."""
    from conftest import good_record

    build_adapter(model_cfg(tiny_name)).save_base(tmp_path / "weights")
    pairs = pair_files([good_record(tmp_path, i, n) for i, n in enumerate([1, 3, 5, 1, 3, 5])])
    cfg = compose_train([f"model={WEIGHTS_CONFIG_OF[tiny_name]}", f"model.path={tmp_path / 'weights'}",
                         "model.dtype=float32", "model.gradient_checkpointing=false", "model.lora.r=8",
                         "model.lora.alpha=16", "data=pairs", f"data.pairs={pairs}",
                         f"data.image_root={tmp_path / 'images'}", "data.batch_size=2", "trainer.max_steps=2"],
                        tmp_path)
    result = train(cfg)
    assert result.global_step == 2
    assert (result.run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_checkpoint_without_weights_names_the_path(name: str, tmp_path: Path) -> None:
    with pytest.raises(ModelWeightsNotFoundError) as info:
        train(compose_train([f"model={name}"], tmp_path))
    message = str(info.value)
    assert REAL[name] in message and "model.path=" in message and "huggingface-cli download" in message


# (model, image sizes of one prompt, image index, pixel box, {span position: expected coverage}) worked out by
# hand from each model's preprocessing; every other position of that image's span must be 0.
GEOMETRY_CASES = [
    # smart_resize(56, 112) = 56 × 112 → 2 × 4 tokens of 28 px; the last cell is token 7.
    ("tiny_qwen2_vl", [(112, 56)], 0, (84, 28, 112, 56), {7: 1.0}),
    ("tiny_qwen2_5_vl", [(112, 56)], 0, (0, 0, 28, 28), {0: 1.0}),
    # 64 × 32 → 2 × 1 tiles of 32 px (2 × 2 tokens each) + thumbnail: the box is tile 1's first cell (token 4)
    # and half of the thumbnail's cell (0, 1) (token 8 + 1).
    ("tiny_internvl", [(64, 32)], 0, (32, 0, 48, 16), {4: 1.0, 9: 0.5}),
    # Several images: each padded to 64 × 64 (16 px on top), 4 × 4 cells of 16 px; rows 16–32 of the image are
    # rows 32–48 of the square: cell (2, 0) = token 8.
    ("tiny_llava_onevision", [(64, 32), (32, 32)], 0, (0, 16, 16, 32), {8: 1.0}),
    # One image (anyres): base 4 × 4 over 64 × 32 → half of cell (3, 3) = token 15; high-res grid 4 × 8 with a
    # newline per row → cell (3, 7) = 16 + 3 × 9 + 7.
    ("tiny_llava_onevision", [(64, 32)], 0, (56, 24, 64, 32), {15: 0.5, 50: 1.0}),
    # Gemma 4 keeps the aspect ratio within 70 soft tokens: 96 × 40 → 5 × 12 cells of 8 × 8 px, row-major.
    ("tiny_gemma4", [(96, 40)], 0, (84, 32, 96, 40), {58: 0.5, 59: 1.0}),
    # MiniCPM-V 4.6: 64 × 32 → global view 1 × 3 tokens (span 0-2), then </image><slice> and two 2 × 2 slices (span
    # 5-8 and, after </slice><slice>, 11-14); the box is the right slice's last cell and 3/8 of the global view's last.
    ("tiny_minicpm_v4_6", [(64, 32)], 0, (48, 16, 64, 32), {2: 0.375, 14: 1.0}),
]


@pytest.mark.parametrize(("name", "sizes", "index", "box", "expected"), GEOMETRY_CASES)
def test_pixel_box_maps_to_the_expected_tokens(name, sizes, index, box, expected) -> None:
    adapter = build_adapter(model_cfg(name))
    geometry = adapter.plan_images(sizes)[index]
    coverage = geometry.token_coverage(box)
    assert {int(i): round(float(coverage[i]), 6) for i in np.flatnonzero(coverage)} == expected


@pytest.mark.parametrize("name", ["tiny_idefics3", "tiny_smolvlm"])
def test_idefics3_tiles_map_boxes_past_their_tags(name: str) -> None:
    """64 × 32 → 1 × 2 tiles (2 × 2 tokens each) + global view: the box is tile (1, 2)'s first cell."""
    adapter = build_adapter(model_cfg(name))
    picture = [Image.new("RGB", (64, 32))]
    sample = adapter.encode(picture, prompt(1), "Red.")
    geometry, (start, _) = sample.geometries[0], sample.image_spans[0]
    assert geometry.layout == (1, 2)
    coverage = geometry.token_coverage((32, 0, 48, 16))
    hits = {int(i): float(coverage[i]) for i in np.flatnonzero(coverage)}
    tile_two = geometry.grids[1].token_offset
    assert hits == {tile_two: 1.0, geometry.grids[2].token_offset + 1: 0.5}
    assert adapter.tokenizer.convert_ids_to_tokens(int(sample.input_ids[start + tile_two - 1])) == "<row_1_col_2>"


def without_video(processor_class: type) -> type:
    """transformers' processor minus its video processor (which needs torchvision), for comparison only."""

    class ImagesOnly(processor_class):  # type: ignore[valid-type, misc]
        def __init__(self, image_processor=None, tokenizer=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, **kwargs)

    return ImagesOnly


def images_only_minicpm(processor_class):
    """MiniCPM-V 4.6's processor without its video processor (which needs torchvision): its own settings read off
    the image processor and the tokenizer, as its ``__init__`` reads them off both."""
    from transformers.processing_utils import ProcessorMixin

    class ImagesOnly(processor_class):  # type: ignore[valid-type, misc]
        def __init__(self, image_processor, tokenizer):
            ProcessorMixin.__init__(self, image_processor, tokenizer)
            self.slice_mode = self.video_slice_mode = image_processor.slice_mode
            self.default_use_image_id = image_processor.use_image_id
            self.image_token_divisor = self.video_token_divisor = 4 if image_processor.downsample_mode == "4x" else 16
            for name in ("image_token", "image_token_id", "video_token", "video_token_id", "image_start_token",
                         "image_end_token", "slice_start_token", "slice_end_token", "image_id_start_token",
                         "image_id_end_token"):
                setattr(self, name, getattr(tokenizer, name))

    return ImagesOnly


def reference_processor(name: str, adapter: ModelAdapter):
    from transformers import (
        Gemma3Processor,
        Gemma4Processor,
        Glm4vProcessor,
        Idefics3Processor,
        InternVLProcessor,
        LlavaOnevisionProcessor,
        MiniCPMV4_6Processor,
        Qwen2VLProcessor,
        Qwen3VLProcessor,
    )

    config = adapter.base_model.config
    if name == "tiny_idefics3":
        vision = config.vision_config
        seq = (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2
        return Idefics3Processor(image_processor=adapter.image_processor, tokenizer=adapter.tokenizer,
                                 image_seq_len=seq), "<image>"
    if name in ("tiny_qwen2_vl", "tiny_qwen2_5_vl"):
        return (without_video(Qwen2VLProcessor)(image_processor=adapter.image_processor, tokenizer=adapter.tokenizer),
                "<|vision_start|><|image_pad|><|vision_end|>")
    if name == "tiny_gemma3":
        return Gemma3Processor(image_processor=adapter.image_processor, tokenizer=adapter.tokenizer,
                               image_seq_length=config.mm_tokens_per_image), "<start_of_image>"
    if name == "tiny_gemma4":  # its processor insists on an audio feature extractor and a video processor
        class ImagesOnlyGemma4(Gemma4Processor):
            def check_argument_for_proper_class(self, argument_name, argument):
                if argument is None and argument_name in ("feature_extractor", "video_processor"):
                    return None
                return super().check_argument_for_proper_class(argument_name, argument)

        return ImagesOnlyGemma4(feature_extractor=None, image_processor=adapter.image_processor,
                                tokenizer=adapter.tokenizer, video_processor=None), "<|image|>"
    if name == "tiny_minicpm_v4_6":
        return images_only_minicpm(MiniCPMV4_6Processor)(adapter.image_processor, adapter.tokenizer), "<|image_pad|>"
    if name in QWEN3:  # Qwen3.5's processor is Qwen3-VL's (transformers maps qwen3_5 to Qwen3VLProcessor)
        return (without_video(Qwen3VLProcessor)(image_processor=adapter.image_processor, tokenizer=adapter.tokenizer),
                "<|vision_start|><|image_pad|><|vision_end|>")
    if name in GLM:  # GLM-4.6V's processor (Glm46VProcessor) expands images as GLM-4.1V's does
        return (without_video(Glm4vProcessor)(image_processor=adapter.image_processor, tokenizer=adapter.tokenizer),
                "<|begin_of_image|><|image|><|end_of_image|>")
    if name in ("tiny_internvl", "tiny_internvl3_5"):
        return without_video(InternVLProcessor)(image_processor=adapter.image_processor, tokenizer=adapter.tokenizer,
                                                image_seq_length=config.image_seq_length), "<IMG_CONTEXT>"
    vision = config.vision_config
    return without_video(LlavaOnevisionProcessor)(
        image_processor=adapter.image_processor, tokenizer=adapter.tokenizer,
        num_image_tokens=(vision.image_size // vision.patch_size) ** 2, vision_feature_select_strategy="full",
        vision_aspect_ratio=config.vision_aspect_ratio), "<image>"


@pytest.mark.parametrize("name", ["tiny_qwen2_vl", "tiny_qwen2_5_vl", "tiny_idefics3", "tiny_internvl",
                                  "tiny_llava_onevision", *QWEN3, "tiny_internvl3_5", "tiny_gemma3", "tiny_gemma4",
                                  *GLM, "tiny_minicpm_v4_6"])
@pytest.mark.parametrize("n_images", [1, 3])
def test_prompt_tokens_and_pixels_match_the_transformers_processor(name: str, n_images: int) -> None:
    adapter = build_adapter(model_cfg(name))
    processor, placeholder = reference_processor(name, adapter)
    picture = images(n_images)
    sample = adapter.encode(picture, prompt(n_images))
    text = adapter.template.render(prompt(n_images)).replace("<image>", placeholder)
    if adapter.tokenizer.bos_token:
        text = adapter.tokenizer.bos_token + text
    expected = processor(text=[text], images=[picture], return_tensors="pt", add_special_tokens=False)
    assert expected["input_ids"][0].tolist() == sample.input_ids.tolist()
    batch = adapter.collate([sample])
    pixels = expected["pixel_values"]
    if name == "tiny_llava_onevision" and n_images > 1:
        pixels = pixels[:, :1]
    assert torch.allclose(batch["pixel_values"], pixels.to(batch["pixel_values"].dtype))


@pytest.mark.parametrize("name", ["tiny_qwen2_vl", "tiny_internlm_xc25"])
def test_merged_dynamic_model_reloads_through_its_adapter(name: str, tmp_path: Path) -> None:
    from miadpo.merge import merge_adapter

    result = train(compose_train([f"model={name}", "trainer.max_steps=2", "data.synthetic.num_pairs=8",
                                  "data.batch_size=2", "optim.lr=5e-2"], tmp_path))
    merged = merge_adapter(result.run_dir / "adapter", tmp_path / "merged")
    cfg = model_cfg(name)
    cfg.path = str(merged)
    reloaded = build_adapter(cfg)
    base_cfg = model_cfg(name)
    base_cfg.path = str(result.run_dir / "base_model")
    base = build_adapter(base_cfg)
    sample = reloaded.encode(images(2), prompt(2), "Red.")
    batch = reloaded.collate([sample])
    with torch.no_grad():
        merged_logits = reloaded.model(**batch).logits
        base_logits = base.model(**batch).logits
        policy_logits = PeftModel.from_pretrained(base.model, result.run_dir / "adapter")(**batch).logits
    assert not torch.allclose(merged_logits, base_logits, atol=1e-4)  # the LoRA update is in the merged weights
    assert torch.allclose(merged_logits, policy_logits, atol=1e-4)


def test_fsdp_units_are_the_models_own_decoder_layers(zoo: ModelAdapter) -> None:
    """``strategy=fsdp`` shards each of ``decoder_layers()`` (DPOModule.configure_model): they are all the model's
    decoder layers, of the class transformers itself keeps whole (``_no_split_modules``)."""
    layers = zoo.decoder_layers()
    assert len(layers) == zoo.base_model.config.get_text_config().num_hidden_layers
    assert {type(layer).__name__ for layer in layers} <= set(zoo.base_model._no_split_modules)


def test_freeze_switches_leave_only_the_chosen_group_trainable(zoo_name: str) -> None:
    cfg = model_cfg(zoo_name)
    cfg.merge_with({"lora": {"enabled": False}, "freeze_vision_tower": True, "freeze_projector": False,
                    "freeze_llm": True})
    adapter = build_adapter(cfg)
    adapter.prepare_for_training()
    groups = adapter.module_groups()
    projector = {id(p) for p in groups["projector"].parameters()}
    in_groups = {id(p) for g in groups.values() for p in g.parameters()}
    head = {id(p) for p in adapter.base_model.get_output_embeddings().parameters()}
    trainable = [n for n, p in adapter.model.named_parameters() if p.requires_grad]
    # Trainable: the projector and parameters outside every group and the LM head (e.g. OneVision's newline).
    assert trainable and all(id(p) in projector or (id(p) not in in_groups and id(p) not in head)
                             for p in adapter.model.parameters() if p.requires_grad), trainable
    assert all(p.requires_grad for p in groups["projector"].parameters())
    assert not any(p.requires_grad for p in adapter.base_model.get_output_embeddings().parameters())


def test_gradient_checkpointing_and_lora_backward(zoo_name: str) -> None:
    cfg = model_cfg(zoo_name)
    cfg.merge_with({"gradient_checkpointing": True, "freeze_projector": False, "attn_implementation": "eager"})
    adapter = build_adapter(cfg)
    adapter.prepare_for_training()
    assert adapter.base_model.is_gradient_checkpointing
    assert adapter.base_model.config._attn_implementation == "eager"
    adapter.model.train()
    loss = adapter.model(**adapter.collate([adapter.encode(images(2), prompt(2), "Red.")])).loss
    loss.backward()
    projector = list(adapter.module_groups()["projector"].parameters())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in projector)


def test_internvl3_5_runs_on_a_qwen3_language_model() -> None:
    """InternVL3.5's layout: InternVL3's tiles on Qwen3 decoder layers (per-head query/key RMSNorm)."""
    layer = build_adapter(model_cfg("tiny_internvl3_5")).decoder_layers()[0]
    assert type(layer).__name__ == "Qwen3DecoderLayer" and hasattr(layer.self_attn, "q_norm")
    assert type(build_adapter(model_cfg("tiny_internvl")).decoder_layers()[0]).__name__ == "Qwen2DecoderLayer"


def test_gemma3_image_tokens_see_each_other_and_text_does_not_see_ahead() -> None:
    """Gemma 3's mask through our collate (``token_type_ids``): at the global layer an image's first soft token
    attends to its last one; the text before the image and the first image do not see the next image."""
    adapter = build_adapter(model_cfg("tiny_gemma3"))
    adapter.model.set_attn_implementation("eager")
    sample = adapter.encode(images(2), prompt(2), "Red.")
    with torch.no_grad():
        weights = adapter.model(**adapter.collate([sample]), output_attentions=True).attentions[3][0]  # (H, L, L)
    (first, first_end), (second, second_end) = sample.image_spans
    assert (weights[:, first, first_end - 1] > 0).all()  # bidirectional inside the image
    assert (weights[:, first - 1, first] == 0).all()  # causal for the text before it
    assert (weights[:, first_end - 1, second:second_end] == 0).all()  # one image does not see the next


def test_gemma4_image_tokens_see_each_other_in_sliding_layers_through_our_collate() -> None:
    """Gemma 4's mask through our collate (``mm_token_type_ids``): in a sliding-window layer an image's first soft token
    attends to its last one (the window notwithstanding); global layers stay causal; the text before the image and
    the first image do not see the next image."""
    adapter = build_adapter(model_cfg("tiny_gemma4"))
    adapter.model.set_attn_implementation("eager")
    sample = adapter.encode(images(2), prompt(2), "Red.")
    with torch.no_grad():
        attentions = adapter.model(**adapter.collate([sample]), output_attentions=True).attentions
    sliding, global_ = attentions[0][0], attentions[1][0]  # (H, L, L)
    (first, first_end), (second, second_end) = sample.image_spans
    assert (sliding[:, first, first_end - 1] > 0).all()  # bidirectional inside the image, past the 8-token window
    assert (global_[:, first, first_end - 1] == 0).all()  # causal at a global layer
    for weights in (sliding, global_):
        assert (weights[:, first - 1, first] == 0).all()  # causal for the text before it
        assert (weights[:, first_end - 1, second:second_end] == 0).all()  # one image does not see the next


def test_gemma4_soft_tokens_fill_the_smallest_budget_and_keep_the_aspect_ratio() -> None:
    """The tiny Gemma 4 takes the smallest budget the processor allows (70): the test images carry 55–70 soft tokens,
    a wide image more columns than rows and a tall one the reverse, a 1 × 200 strip one column of 70."""
    adapter = build_adapter(model_cfg("tiny_gemma4"))
    assert adapter.image_processor.max_soft_tokens == 70
    geometries = adapter.plan_images([*SIZES, (1, 200)])
    assert [g.num_tokens for g in geometries[:5]] == [55, 60, 64, 66, 60]
    wide, tall, strip = geometries[0].grids[0], geometries[1].grids[0], geometries[5].grids[0]
    assert wide.cols > wide.rows and tall.rows > tall.cols and (strip.rows, strip.cols) == (70, 1)


def test_minicpm_image_numbers_follow_the_image_processors_use_image_id() -> None:
    """With ``use_image_id`` off (a checkpoint may ship it so), no ``<image_id>k</image_id>``, as transformers'
    processor writes it; the ids still match the processor's."""
    from transformers import MiniCPMV4_6Processor

    adapter = build_adapter(model_cfg("tiny_minicpm_v4_6"))
    adapter.image_processor.use_image_id = False
    processor = images_only_minicpm(MiniCPMV4_6Processor)(adapter.image_processor, adapter.tokenizer)
    sample = adapter.encode(images(2), prompt(2))
    text = adapter.template.render(prompt(2)).replace("<image>", "<|image_pad|>")
    expected = processor(text=[text], images=[images(2)], return_tensors="pt", add_special_tokens=False)
    assert expected["input_ids"][0].tolist() == sample.input_ids.tolist()
    assert "<image_id>" not in adapter.tokenizer.decode(sample.input_ids)


def test_hidden_forward_never_runs_the_lm_head_over_the_sequence(zoo: ModelAdapter) -> None:
    """The DPO forwards read the decoder's last hidden states and run the LM head on answer rows later: no family's
    ``hidden_forward`` computes logits over its positions (MiniCPM-V 4.6's forward takes no ``logits_to_keep``, so its
    adapter runs the inner model)."""
    batch = zoo.collate([zoo.encode(images(2), prompt(2), "Red.")])
    batch.pop("labels")
    positions: list[int] = []
    handle = zoo.base_model.get_output_embeddings().register_forward_hook(
        lambda _module, args, _output: positions.append(args[0].shape[-2]))
    try:
        with torch.no_grad():
            hidden, _ = zoo.hidden_forward(zoo.model, **batch)
    finally:
        handle.remove()
    assert hidden.shape[:2] == batch["input_ids"].shape
    assert all(n == 0 for n in positions), positions
    with torch.no_grad():
        logits = zoo.model(**batch).logits
    assert torch.allclose(zoo.logits_of(zoo.model, hidden), logits, atol=1e-5)
