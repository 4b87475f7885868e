"""Selection: attention capture, ratios, rules, post-selection, caching, resume, DDP, exports, chaining."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import REPO, colour_image, compose_train
from interrupt import INTERRUPTED, interrupted_command
from omegaconf import OmegaConf
from PIL import Image
from test_augment import PHOTOS, write_source

from miadpo.augment.formats import compose_grid, compose_pip, grid_conversations, sequence_conversations
from miadpo.augment.noise import add_noise, record_rng
from miadpo.config import DataConfig, ExportImagePaths, GridAugmentConfig, SelectionConfig
from miadpo.data.pairs import ImageRoots, PairRecord
from miadpo.models.samples import EncodedSample
from miadpo.select import stage as stage_module
from miadpo.select.candidates import CandidateGenerator, SelectionInput
from miadpo.select.capture import region_ratio, sequence_ratio
from miadpo.select.records import Candidate, ExtraAnswer
from miadpo.select.rules import KEPT, edit_similarity, select_pairs
from miadpo.select.stage import CANDIDATES_FILE, run_selection, write_exports
from miadpo.text import normalise_answer
from miadpo.train import train

QUESTION = [{"from": "human", "value": "<image>\nWhat colour is the box?"}, {"from": "gpt", "value": "Red."}]


def selection_config(**overrides: Any) -> SelectionConfig:
    cfg = OmegaConf.structured(SelectionConfig)
    cfg.merge_with(overrides)
    return cfg  # type: ignore[return-value]


# ----- attention capture --------------------------------------------------------------------------------
def capture_cases(tmp_path: Path) -> list[SelectionInput]:
    """Sequence prompts with 1–5 images, a grid and a pic-in-pic, written as files the generator loads."""
    items = []
    for n in (1, 2, 3, 4, 5):
        paths = []
        for k in range(n):
            colour_image((40 + 9 * k, 56), (50 * k, 90, 200 - 30 * k)).save(tmp_path / f"s{n}_{k}.png")
            paths.append(f"s{n}_{k}.png")
        items.append(SelectionInput(f"sequence-{n}", "sequence", n, n, tuple(paths),
                                    sequence_conversations(QUESTION, n, n)[0]["value"], "Red.", None))
    tiles = [colour_image((60, 40 + 10 * k), (40 * k, 120, 30)) for k in range(4)]
    grid, layout = compose_grid(tiles, GridAugmentConfig(cell_size=64, gap=8, band=10, font_size=8, label_x=2))
    grid.save(tmp_path / "grid.png")
    items.append(SelectionInput("grid", "grid", 4, 3, ("grid.png",), grid_conversations([(QUESTION, 3)])[0]["value"],
                                "Red.", tuple(layout["tiles"][2])))
    pip, layout = compose_pip(colour_image((50, 50), (255, 0, 0)), colour_image((90, 60), (0, 0, 255)), 0.7)
    pip.save(tmp_path / "pip.png")
    items.append(SelectionInput("pip", "pip", 1, 1, ("pip.png",), "<image>\nFor the central image, what colour?",
                                "Red.", tuple(layout["box"])))
    return items


def test_captured_rows_equal_a_full_eager_forward(adapter, tmp_path: Path, monkeypatch) -> None:
    """Rows recorded while generating (SDPA everywhere) = the same rows of an eager output_attentions forward."""
    check_capture_against_eager(adapter, 1, tmp_path, monkeypatch)  # the middle of 2 layers


@pytest.mark.parametrize("name", ["tiny_glm4v", "tiny_glm4v_moe"])
def test_mrope_families_capture_equals_a_full_eager_forward(name: str, tmp_path: Path, monkeypatch) -> None:
    """GLM-4.xV (3-D rotary positions on half of each head, a routed-experts decoder): the recorded rows at the
    middle layer equal an eager forward's attentions."""
    check_capture_against_eager(tiny_adapter(name), 1, tmp_path, monkeypatch)


def tiny_adapter(name: str):
    from hydra import compose, initialize_config_dir

    from miadpo.models import build_adapter
    from miadpo.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return build_adapter(compose(config_name="train", overrides=[f"model={name}"]).model)


@pytest.mark.parametrize("name", ["tiny_qwen3_5", "tiny_gemma3", "tiny_minicpm_v4_6"])
def test_hybrid_decoder_captures_at_a_full_attention_layer(name: str, tmp_path: Path, monkeypatch) -> None:
    """The middle layer (2 of 4) is linear attention (Qwen3.5, MiniCPM-V 4.6) or sliding-window attention (Gemma 3):
    selection
    reads the global layer 3, exactly; naming another layer stops with the layers it reads."""
    from miadpo.select.capture import resolve_layer

    adapter = tiny_adapter(name)
    assert adapter.base_model.config.get_text_config().layer_types[2] in ("linear_attention", "sliding_attention")
    assert resolve_layer(adapter, -1) == 3
    with pytest.raises(ValueError, match=rf"layer 1 of {name} is a linear-attention.*layers it reads: \[3\]"):
        resolve_layer(adapter, 1)
    check_capture_against_eager(adapter, 3, tmp_path, monkeypatch)


def test_gemma4_captures_at_a_global_layer_that_shares_its_keys(tmp_path: Path, monkeypatch) -> None:
    """Gemma 4's tiny decoder alternates sliding-window and global layers, the last two reusing the first two's keys
    and values: selection reads global layer 1 by default, refuses sliding layer 2, and layer 3 (global, keys from
    layer 1) records what an eager forward computes."""
    from miadpo.select.capture import resolve_layer

    adapter = tiny_adapter("tiny_gemma4")
    assert adapter.base_model.config.get_text_config().num_kv_shared_layers == 2
    assert resolve_layer(adapter, None) == 1
    with pytest.raises(ValueError, match=r"layer 2 of tiny_gemma4 is a linear-attention.*layers it reads: \[1, 3\]"):
        resolve_layer(adapter, 2)
    check_capture_against_eager(adapter, 3, tmp_path, monkeypatch)


def check_capture_against_eager(adapter, layer: int, tmp_path: Path, monkeypatch) -> None:
    """Generate on the capture cases with the resolved layer; its recorded rows = an eager forward's attentions."""
    attention = adapter.attention_module(adapter.decoder_layers()[layer])
    modeling = sys.modules[type(attention).__module__]
    eager = copy.deepcopy(adapter.model)
    eager.set_attn_implementation("eager")

    def no_eager(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a layer ran eager attention")

    items = capture_cases(tmp_path)
    generator = CandidateGenerator(adapter, selection_config(generation={"max_new_tokens": 10}, layer=layer),
                                   ImageRoots(tmp_path, tmp_path), seed=0)
    assert generator.layer == layer
    prompts = [adapter.encode(adapter.process_images(generator._images(item)), item.prompt) for item in items]
    with monkeypatch.context() as patch:
        patch.setattr(modeling, "eager_attention_forward", no_eager)  # every layer must stay on SDPA
        generated = generator.generate(prompts)
    assert attention.config._attn_implementation == "sdpa"
    for b, (item, prompt) in enumerate(zip(items, prompts)):
        answer = torch.tensor(generated.answers[b])
        assert len(answer) == 10
        full = adapter.collate([EncodedSample(torch.cat([prompt.input_ids, answer]), torch.cat(
            [prompt.labels, answer]), prompt.image_spans, prompt.geometries, prompt.pixel_values,
            prompt.prompt_length, prompt.extra)])
        full.pop("labels")
        with torch.no_grad():
            # (H, L, L); a hybrid decoder's output lists only the layers with attention weights
            every = eager(**full, output_attentions=True).attentions
            index = layer if len(every) == len(adapter.decoder_layers()) else adapter.attention_layer_indices().index(
                layer)
            attentions = every[index][0]
        start = prompt.prompt_length - 1  # the row that produced the first answer token
        columns = torch.cat([torch.arange(s, e) for s, e in prompt.image_spans])
        expected = attentions[:, start : start + len(answer)][:, :, columns].mean(0)
        captured = generated.image_rows(b, prompt)
        assert captured.shape == expected.shape
        assert torch.allclose(captured, expected, atol=1e-5), item.id


# ----- ratios with hand-built maps ---------------------------------------------------------------------
def test_sequence_ratio_hand_built() -> None:
    # Three images of 4 tokens: means 0.1, 0.3, 0.2 → target 2 share 0.3 / 0.6 = 0.5.
    attention = np.array([0.1] * 4 + [0.2, 0.4, 0.3, 0.3] + [0.2] * 4)
    ratio, scores = sequence_ratio(attention, [(0, 4), (4, 8), (8, 12)], target=2)
    assert scores == pytest.approx([0.1, 0.3, 0.2]) and ratio == pytest.approx(0.5)
    assert sequence_ratio(attention, [(0, 4), (4, 8), (8, 12)], target=1)[0] == pytest.approx(1 / 6)


def test_grid_ratio_through_pad_to_square(adapter) -> None:
    """A 936 × 488 (1×2) grid is padded to 936 × 936 (image at y 224..712), then 4 × 4 cells of 234 px.

    Tile 1 = [0, 40, 448, 488] → padded y 264..712, x 0..448.
    Column coverage: col 0 = 1, col 1 = (448 − 234) / 234 = 0.91453; rows: row 1 = (468 − 264) / 234 = 0.87179,
    row 2 = 1, row 3 = (712 − 702) / 234 = 0.04274.
    """
    geometry = adapter.process_images([Image.new("RGB", (936, 488), "white")]).geometries[0]
    coverage = geometry.token_coverage((0, 40, 448, 488)).reshape(4, 4)
    expected = np.outer([0, 0.87179, 1, 0.04274], [1, 0.91453, 0, 0])
    assert np.allclose(coverage, expected, atol=1e-4)
    uniform = np.ones(16)
    assert region_ratio(uniform, coverage.reshape(-1)) == pytest.approx(expected.sum() / 16, abs=1e-4)
    padding_only = np.zeros(16)
    padding_only[:4] = 1.0  # all attention on the top row: the grey padding band
    assert region_ratio(padding_only, coverage.reshape(-1)) == 0.0
    on_tile = np.zeros(16)
    on_tile[8] = 2.0  # row 2, col 0: fully inside tile 1
    on_tile[11] = 2.0  # row 2, col 3: the other tile
    assert region_ratio(on_tile, coverage.reshape(-1)) == pytest.approx(0.5)


def test_pip_ratio_hand_built(adapter) -> None:
    # Square 56 × 56 image: cells of 14 px; box [14, 14, 42, 42] covers the centre 2 × 2 cells exactly.
    geometry = adapter.process_images([Image.new("RGB", (56, 56), "white")]).geometries[0]
    coverage = geometry.token_coverage((14, 14, 42, 42))
    attention = np.arange(16, dtype=float)
    centre = attention[[5, 6, 9, 10]].sum()
    assert region_ratio(attention, coverage) == pytest.approx(centre / attention.sum())


# ----- rules -------------------------------------------------------------------------------------------
def candidate(index: int, fmt: str, n: int, ratio: float, **fields: Any) -> Candidate:
    base = {"id": f"c{index}", "format": fmt, "n_images": n, "target": 1, "images": ["a.png"],
            "prompt": "<image>\nQ?", "ground_truth": "A red car.", "answer": "A blue bus.", "answer_tokens": 4,
            "ground_truth_tokens": 4, "perplexity": 3.0, "correct": False, "ratio": ratio, "image_scores": None,
            "layer": 1, "logp": -4.0}
    return Candidate(**{**base, **fields})


def test_candidate_records_read_back_to_the_same_line() -> None:
    """candidates.jsonl lines (keys in their order, optional keys only when present) survive a read and a write."""
    negative = {"kind": "runner_up", "asked_about": None, "answer": "Blue.", "answer_tokens": 2, "logp": -1.25,
                "perplexity": 1.8682459574322223}
    maps = [{"grids": [{"rows": 1, "cols": 2, "values": [0.1, 0.30000000000000004]}]}]
    plain = candidate(0, "sequence", 2, 0.1234567890123, image_scores=[0.1, 1e-12], logp=-4.000000000000001).to_json()
    for record in (plain, {**plain, "attention_maps": maps}, {**plain, "negative": negative},
                   {**plain, "attention_maps": maps, "negative": negative}):
        line = json.dumps(record, ensure_ascii=False)
        assert json.dumps(Candidate.from_json(json.loads(line)).to_json(), ensure_ascii=False) == line
    assert Candidate.from_json({**plain, "negative": negative}).negative == ExtraAnswer(**negative)
    with pytest.raises(ValueError, match="unknown keys \\['extra'\\]"):
        Candidate.from_json({**plain, "extra": 1})
    with pytest.raises(ValueError, match="missing keys \\['layer'\\]"):
        Candidate.from_json({k: v for k, v in plain.items() if k != "layer"})


DEFAULT_THRESHOLDS = [("sequence", n, t) for n, t in {2: 0.8, 3: 0.7, 4: 0.6, 5: 0.6}.items()] + \
    [("grid", n, t) for n, t in {2: 0.7, 3: 0.6, 4: 0.5, 5: 0.45, 6: 0.4, 7: 0.37, 8: 0.33, 9: 0.3}.items()] + \
    [("pip", 1, 0.8)]


@pytest.mark.parametrize(("fmt", "n", "threshold"), DEFAULT_THRESHOLDS)
def test_threshold_boundaries(fmt: str, n: int, threshold: float) -> None:
    cands = [candidate(0, fmt, n, threshold), candidate(1, fmt, n, threshold - 1e-6),
             candidate(2, fmt, n, threshold + 1e-6)]
    decisions = {d["id"]: d["decision"] for d in select_pairs(cands, selection_config(), 0).decisions}
    at_threshold_kept = fmt == "sequence"  # ≤ for sequence, < for grid and pip
    assert (decisions["c0"] == KEPT) is at_threshold_kept
    assert decisions["c1"] == KEPT and decisions["c2"] != KEPT


def test_operator_is_configurable_per_format() -> None:
    cfg = selection_config(operators={"grid": "<="})
    assert select_pairs([candidate(0, "grid", 4, 0.5)], cfg, 0).decisions[0]["decision"] == KEPT
    with pytest.raises(ValueError, match="selection.operators.grid"):
        select_pairs([candidate(0, "grid", 4, 0.5)], selection_config(operators={"grid": "!="}), 0)
    with pytest.raises(ValueError, match="selection.thresholds.grid.11"):
        select_pairs([candidate(0, "grid", 11, 0.1)], selection_config(), 0)


def test_correct_empty_and_confident_answers_are_not_pairs() -> None:
    cands = [candidate(0, "pip", 1, 0.1, answer="a RED car"), candidate(1, "pip", 1, 0.1, answer=""),
             candidate(2, "pip", 1, 0.1, perplexity=1.05), candidate(3, "pip", 1, 0.1)]
    cands[0].correct = normalise_answer(cands[0].answer) == normalise_answer(cands[0].ground_truth)
    result = select_pairs(cands, selection_config(), 0)
    assert [d["decision"] for d in result.decisions] == ["answer matches the ground truth", "empty answer",
                                                         "perplexity <= 1.1", KEPT]
    pair = result.pairs[0]
    assert (pair.chosen, pair.rejected, pair.meta["attention_ratio"]) == ("A red car.", "A blue bus.", 0.1)


def test_random_baseline_ignores_attention_and_matches_counts() -> None:
    cands = [candidate(i, fmt, n, ratio) for i, (fmt, n, ratio) in enumerate(
        [("grid", 4, r) for r in (0.1, 0.2, 0.9, 0.95, 0.99, 0.8)] + [("pip", 1, r) for r in (0.1, 0.95, 0.97)])]
    attention = select_pairs(cands, selection_config(), 0)
    random_pairs = [select_pairs(cands, selection_config(name="random"), seed) for seed in range(8)]
    count = {"grid N=4": 2, "pip N=1": 1}
    assert attention.report["pairs_by_format"] == count
    assert all(r.report["pairs_by_format"] == count for r in random_pairs)
    drawn = {p.id for r in random_pairs for p in r.pairs}
    assert drawn - {p.id for p in attention.pairs}, "random never drew a pair attention would reject"
    # Reversing the ratios inside each group moves which ids attention keeps, not how many: random's draw
    # (same seed) must not move at all.
    reversed_ratios = [r for group in ((0.8, 0.99, 0.95, 0.9, 0.2, 0.1), (0.97, 0.95, 0.1)) for r in group]
    shuffled = [replace(c, ratio=r) for c, r in zip(cands, reversed_ratios)]
    assert {p.id for p in select_pairs(shuffled, selection_config(), 0).pairs} != {p.id for p in attention.pairs}
    assert [p.id for p in select_pairs(shuffled, selection_config(name="random"), 3).pairs] == \
        [p.id for p in random_pairs[3].pairs]


@pytest.mark.parametrize(
    ("post", "field", "inside", "outside", "reason"),
    [
        ({"perplexity_min": 2.0, "perplexity_max": 5.0}, "perplexity", 2.0, 5.5, "post: perplexity out of range"),
        ({"length_ratio_min": 0.5, "length_ratio_max": 2.0}, "answer_tokens", 8, 9, "post: length ratio out of range"),
    ],
)
def test_post_filter_bounds(post, field, inside, outside, reason) -> None:
    cands = [candidate(0, "pip", 1, 0.1, **{field: inside}), candidate(1, "pip", 1, 0.1, **{field: outside})]
    result = select_pairs(cands, selection_config(post=post), 0)
    assert [d["decision"] for d in result.decisions] == [KEPT, reason]
    assert result.report["dropped"] == {reason: 1}


def test_edit_similarity_bounds() -> None:
    near = candidate(0, "pip", 1, 0.1, answer="A red car!")  # similarity 0.9 with "A red car."
    far = candidate(1, "pip", 1, 0.1, answer="Nothing at all here")
    mid = candidate(2, "pip", 1, 0.1)
    assert edit_similarity("A red car.", "A red car!") == pytest.approx(0.9)
    result = select_pairs([near, far, mid], selection_config(post={"edit_similarity_max": 0.8,
                                                                   "edit_similarity_min": 0.3}), 0)
    assert [d["decision"] for d in result.decisions] == ["post: edit similarity out of range"] * 2 + [KEPT]
    assert result.report["dropped"] == {"post: edit similarity out of range": 2}


# ----- generation ------------------------------------------------------------------------------------
def test_noise_is_float_clipped_regional_and_per_record() -> None:
    image = Image.new("RGB", (20, 10), (250, 128, 5))
    noisy = np.asarray(add_noise(image, 225.0, (0, 0, 10, 10), record_rng(0, "a")))
    assert (noisy[:, 10:] == [250, 128, 5]).all()  # outside the box untouched
    assert noisy[:, :10].min() == 0 and noisy[:, :10].max() == 255  # clipped, not wrapped
    again = np.asarray(add_noise(image, 225.0, (0, 0, 10, 10), record_rng(0, "a")))
    other = np.asarray(add_noise(image, 225.0, (0, 0, 10, 10), record_rng(0, "b")))
    assert (noisy == again).all() and not (noisy == other).all()


def test_generation_does_not_depend_on_batch_composition(adapter, tmp_path: Path) -> None:
    roots = ImageRoots(tmp_path, tmp_path)
    items = []
    for i, n in enumerate([1, 3, 5, 2]):
        paths = []
        for k in range(n):
            colour_image((30 + 7 * k, 40), (60 * k, 40 * i, 99)).save(tmp_path / f"{i}_{k}.png")
            paths.append(f"{i}_{k}.png")
        items.append(SelectionInput(f"r{i}", "sequence", n, 1, tuple(paths),
                                    sequence_conversations(QUESTION, n, 1)[0]["value"], "Red.", None))
    generator = CandidateGenerator(adapter, selection_config(generation={"max_new_tokens": 12}), roots, seed=0)
    batched = generator(items)
    alone = [generator([item])[0] for item in items]
    for a, b in zip(batched, alone):
        assert a.answer == b.answer and a.answer_tokens == 12
        assert a.ratio == pytest.approx(b.ratio, abs=1e-5) and a.logp == pytest.approx(b.logp, abs=1e-4)
        assert len(a.image_scores) == a.n_images


# ----- the stage ----------------------------------------------------------------------------------------
def stage_data(tmp_path: Path, **overrides: Any) -> DataConfig:
    source = write_source(tmp_path, n_generated=6)
    cfg = OmegaConf.structured(DataConfig(source=str(source), image_root=str(tmp_path / "images"),
                                          out_dir=str(tmp_path / "out"), max_bad_fraction=0.5))
    cfg.merge_with(overrides)
    return cfg  # type: ignore[return-value]


CPU = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "enable_model_summary": False}


def test_stage_writes_pairs_report_and_exports(adapter, tmp_path: Path) -> None:
    data = stage_data(tmp_path)
    pairs_path = run_selection(adapter, data, selection_config(generation={"max_new_tokens": 6}), 0, CPU)
    out = pairs_path.parent
    pairs = [json.loads(line) for line in pairs_path.read_text().splitlines()]
    report = json.loads((out / "report.json").read_text())
    lines = (out.parent / CANDIDATES_FILE).read_text().splitlines()
    candidates = [json.loads(line) for line in lines]
    assert [json.dumps(Candidate.from_json(c).to_json(), ensure_ascii=False) for c in candidates] == lines
    records = (tmp_path / "out" / "records.jsonl").read_text().splitlines()
    assert report["candidates"] == len(candidates) == len(records) > len(PHOTOS)
    assert report["pairs"] == len(pairs) > 0
    decisions = [json.loads(line) for line in (out / "decisions.jsonl").read_text().splitlines()]
    assert len(decisions) == len(candidates) and sum(d["decision"] == KEPT for d in decisions) == len(pairs)
    assert "pairs:" in (out / "report.txt").read_text()
    trl = [json.loads(line) for line in (out / "trl.jsonl").read_text().splitlines()]
    assert trl[0]["prompt"][0]["role"] == "user" and all((out / p).is_file() for p in trl[0]["images"])
    assert sum(part["type"] == "image" for part in trl[0]["prompt"][0]["content"]) == len(trl[0]["images"])
    factory = json.loads((out / "llamafactory.json").read_text())
    assert factory[0]["chosen"]["from"] == "gpt" and factory[0]["conversations"][0]["value"] == pairs[0]["prompt"]
    assert json.loads((out / "dataset_info.json").read_text())["miadpo"]["ranking"] is True
    # The exports survive a move of the data tree: image paths are relative to the pair directory
    # (LLaMA-Factory's media_dir defaults to its dataset_dir), unless selection.export_image_paths=absolute.
    moved = tmp_path.parent / f"{tmp_path.name}-moved"
    shutil.copytree(tmp_path, moved)
    moved_out = moved / out.relative_to(tmp_path)
    for name in ("trl.jsonl", "llamafactory.json"):
        text = (moved_out / name).read_text()
        rows = [json.loads(line) for line in text.splitlines()] if name.endswith("jsonl") else json.loads(text)
        paths = [p for row in rows for p in row["images"]]
        assert paths and not any(Path(p).is_absolute() for p in paths)
        assert all((moved_out / p).is_file() and (moved_out / p).resolve().is_relative_to(moved) for p in paths)
    records = [PairRecord(**row) for row in pairs]
    write_exports(out, records, ImageRoots.of(data), ExportImagePaths.absolute)
    absolute = [json.loads(line)["images"] for line in (out / "trl.jsonl").read_text().splitlines()]
    assert absolute[0] == [str((out / p).resolve()) for p in trl[0]["images"]]


def test_changing_a_threshold_reuses_the_candidates(adapter, tmp_path: Path, monkeypatch) -> None:
    data = stage_data(tmp_path)
    first = run_selection(adapter, data, selection_config(generation={"max_new_tokens": 6}), 0, CPU)

    def no_generation(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("generation ran again")

    monkeypatch.setattr(stage_module.CandidateGenerator, "__call__", no_generation)
    stricter = selection_config(generation={"max_new_tokens": 6}, thresholds={"pip": {1: 0.01}},
                                post={"perplexity_max": 1e9})
    second = run_selection(adapter, data, stricter, 0, CPU)
    assert second.parent.parent == first.parent.parent and second.parent != first.parent
    with pytest.raises(AssertionError, match="generation ran again"):
        run_selection(adapter, data, selection_config(generation={"max_new_tokens": 7}), 0, CPU)


def run_select_cli(tmp_path: Path, source: Path, out: str, *extra: str, stop_after: int | None = None
                   ) -> subprocess.Popen:
    """``python -m miadpo.select``; with ``stop_after``, ended like a kill right after that many candidates."""
    launch = ([sys.executable, "-m", "miadpo.select"] if stop_after is None
              else interrupted_command("miadpo.select", "candidates.rank0.jsonl", stop_after))
    args = [*launch, "data=mix", f"data.source={source}",
            f"data.image_root={tmp_path / 'images'}", f"data.out_dir={tmp_path / out}", "data.max_bad_fraction=0.5",
            "selection.generation.max_new_tokens=16", "selection.generation.batch_size=2",
            "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'h' / out}",
            *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def selected(out_dir: Path) -> list[dict[str, Any]]:
    path = next(out_dir.glob("selection/*/pairs-*/pairs.jsonl"))
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_killed_selection_resumes_to_the_same_pairs(tmp_path: Path) -> None:
    source = write_source(tmp_path, n_generated=40)
    proc = run_select_cli(tmp_path, source, "killed", stop_after=6)  # 3 batches of 2
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == INTERRUPTED, err.decode()[-2000:]
    shards = list((tmp_path / "killed").glob("selection/*/candidates.rank0.jsonl"))
    shard = shards[0] if shards else None
    assert shard is not None and not (shard.parent / CANDIDATES_FILE).exists(), "not interrupted half-way"
    done_before = shard.read_bytes().count(b"\n")
    assert done_before == 6
    resumed = run_select_cli(tmp_path, source, "killed")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()[-2000:]
    complete = run_select_cli(tmp_path, source, "complete")
    _, err = complete.communicate(timeout=300)
    assert complete.returncode == 0, err.decode()[-2000:]
    assert selected(tmp_path / "killed") == selected(tmp_path / "complete")
    ids = [json.loads(line)["id"] for line in shard.read_text().splitlines()]
    records = (tmp_path / "killed" / "records.jsonl").read_text().splitlines()
    assert len(ids) == len(set(ids)) == len(records) > done_before


@pytest.mark.slow
def test_two_ddp_processes_select_the_same_pairs_as_one(tmp_path: Path) -> None:
    source = write_source(tmp_path, n_generated=6)
    one = run_select_cli(tmp_path, source, "one")
    two = run_select_cli(tmp_path, source, "two", "strategy=ddp", "trainer.devices=2")
    for proc in (one, two):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
    assert len(list((tmp_path / "two").glob("selection/*/candidates.rank*.jsonl"))) == 2
    a, b = selected(tmp_path / "one"), selected(tmp_path / "two")
    assert [p["id"] for p in a] == [p["id"] for p in b] and a
    assert [p["rejected"] for p in a] == [p["rejected"] for p in b]
    for x, y in zip(a, b):
        assert x["meta"]["attention_ratio"] == pytest.approx(y["meta"]["attention_ratio"], abs=1e-4)


# ----- training chains selection ---------------------------------------------------------------------
def test_train_on_a_source_recipe_selects_first(tmp_path: Path) -> None:
    source = write_source(tmp_path, n_generated=6)
    overrides = ["data=grid", f"data.source={source}", f"data.image_root={tmp_path / 'images'}",
                 "selection.generation.max_new_tokens=6", "selection.thresholds.grid={2:1,3:1,4:1,5:1,6:1,7:1,8:1,9:1}",
                 "selection.min_perplexity=0", "data.val_fraction=0", "trainer.max_steps=2", "data.batch_size=2",
                 "data.max_bad_fraction=0.5", "data.num_workers=0"]
    result = train(compose_train(overrides, tmp_path))
    assert result.global_step == 2
    assert list((tmp_path / "data").glob("selection/*/pairs-*/pairs.jsonl"))


def test_multi_process_training_without_pairs_says_run_select_first(tmp_path: Path) -> None:
    source = write_source(tmp_path)
    cfg = compose_train(["data=grid", f"data.source={source}", f"data.image_root={tmp_path / 'images'}",
                         "strategy=ddp", "trainer.devices=2"], tmp_path)
    with pytest.raises(ValueError, match="run `python -m miadpo.select model=tiny_llava data=grid` first"):
        train(cfg)
    assert not (tmp_path / "data" / "selection").exists()



@pytest.mark.parametrize("share", [0.0, 0.25, 0.5])
def test_calibrated_thresholds_remove_the_stated_share_of_wrong_answers(share: float) -> None:
    from miadpo.select.rules import calibrate_thresholds

    rng = np.random.default_rng(0)
    cands = [candidate(i, "sequence", n, float(rng.uniform(0, 2 / n)))
             for n in (2, 3, 4) for i in range(40 * n, 40 * n + 40)]
    cands += [candidate(500 + i, "grid", 4, float(rng.uniform(0, 1))) for i in range(40)]
    cands += [candidate(900, "sequence", 2, 0.99, answer="Red.", correct=True)]  # right answers do not count
    cfg = selection_config()
    thresholds = calibrate_thresholds(cands, cfg, share)
    assert set(thresholds) == {"sequence", "grid"} and set(thresholds["sequence"]) == {2, 3, 4}
    calibrated = selection_config(thresholds={**thresholds, "pip": {1: 0.8}})
    report = select_pairs(cands, calibrated, 0).report
    removed = sum(v for k, v in report["dropped"].items() if k.startswith("attention ratio"))
    assert removed == round(share * 40) * 4  # the stated share in every (format, N) group
    # The removed ones are those that looked hardest at the target.
    kept = {p.id for p in select_pairs(cands, calibrated, 0).pairs}
    for n in (2, 3, 4):
        group = [c for c in cands if (c.format, c.n_images) == ("sequence", n) and not c.correct]
        assert max(c.ratio for c in group if c.id in kept) < min(
            [c.ratio for c in group if c.id not in kept] or [9.0])


def test_right_answer_pairs_reject_the_answer_about_another_image() -> None:
    """Right answers get a pair when the same question about another image is answered differently."""
    right = {"answer": "A red car.", "correct": True}

    def negative(asked_about: int, answer: str, tokens: int) -> ExtraAnswer:
        return ExtraAnswer(kind="other_image", asked_about=asked_about, answer=answer, answer_tokens=tokens,
                           perplexity=1.5, logp=-2.0)

    cands = [candidate(0, "sequence", 3, 0.3),  # an ordinary wrong answer
             candidate(1, "sequence", 3, 0.3, **right, negative=negative(2, "A green bus.", 4)),
             candidate(2, "sequence", 3, 0.3, **right, negative=negative(1, "a red car", 3)),
             candidate(3, "sequence", 3, 0.3, **right, negative=negative(3, "A long detour.", 12))]
    cfg = selection_config(post={"length_ratio_max": 2.0})
    result = select_pairs(cands, cfg, 0)
    by_id = {p.id: p for p in result.pairs}
    assert set(by_id) == {"c0", "c1-other_image"}
    pair = by_id["c1-other_image"]
    assert (pair.chosen, pair.rejected) == ("A red car.", "A green bus.")
    assert pair.meta["selection"] == "other_image" and pair.meta["asked_about"] == 2
    decisions = {d["id"]: d["decision"] for d in result.decisions}
    assert decisions["c2-other_image"] == "other_image: same as the ground truth"
    assert decisions["c3-other_image"] == "post: length ratio out of range"
    assert result.report["right_answer_pairs"] == 1 and result.report["pairs_by_format"] == {"sequence N=3": 2}


def test_retargeted_question_names_the_other_image_only_in_the_question() -> None:
    from miadpo.augment.formats import retarget_question

    prompt = sequence_conversations(QUESTION, 3, 2)[0]["value"]
    expected = "Image1:<image>\nImage2:<image>\nImage3:<image>\nIn Image3, what colour is the box?"
    assert retarget_question(prompt, 2, 3) == expected
    grid = grid_conversations([(QUESTION, 4)])[0]["value"]
    assert retarget_question(grid, 4, 1) == "<image>\nIn Image1, what colour is the box?"
    with pytest.raises(ValueError, match="exactly once"):
        retarget_question(prompt, 3, 1)


@pytest.mark.parametrize("kind", ["runner_up", "other_image"])
def test_right_answers_get_an_extra_answer_to_reject(tmp_path: Path, adapter, kind: str) -> None:
    """selection.right_answer_negatives: right answers (here: ground truth = the model's own greedy answer) get
    the runner-up answer (another first token, then greedy) or the answer about another image."""
    roots = ImageRoots(tmp_path, tmp_path)
    items = []
    for i, n in enumerate((2, 3, 3)):
        paths = []
        for k in range(n):
            colour_image((32, 32), (60 * k, 40 * i, 200)).save(tmp_path / f"{i}_{k}.png")
            paths.append(f"{i}_{k}.png")
        items.append(SelectionInput(f"r{i}", "sequence", n, 2, tuple(paths),
                                    sequence_conversations(QUESTION, n, 2)[0]["value"], "Red.", None))
    plain = CandidateGenerator(adapter, selection_config(generation={"max_new_tokens": 5}), roots, seed=0)
    items = [replace(item, ground_truth=c.answer) for item, c in zip(items, plain(items))]
    generator = CandidateGenerator(adapter, selection_config(generation={"max_new_tokens": 5},
                                                             right_answer_negatives=kind), roots, seed=0)
    candidates = generator(items)
    assert all(c.correct for c in candidates)
    for item, c in zip(items, candidates):
        negative = c.negative
        assert negative.kind == kind and negative.answer_tokens >= 1 and negative.perplexity >= 1.0
        if kind == "runner_up":
            assert negative.answer != c.answer and negative.asked_about is None  # another first token
        else:
            assert negative.asked_about in set(range(1, item.n_images + 1)) - {item.target}
    assert [c.negative for c in generator(items)] == [c.negative for c in candidates]  # deterministic
