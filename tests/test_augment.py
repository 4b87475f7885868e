"""Augmentation: prompts, layouts and pixels of every format, planning rules, determinism, resume, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skimage.data
from conftest import REPO
from interrupt import INTERRUPTED, interrupted_command
from omegaconf import OmegaConf
from PIL import Image

from miadpo.augment import GRID_LAYOUTS, PIP_PHRASES, Planner, compose_grid, compose_pip, read_llava_source
from miadpo.augment.datamodule import AugmentedRecordsDataModule
from miadpo.augment.formats import (
    grid_conversations,
    has_bbox,
    pip_conversations,
    refusal_conversations,
    sequence_conversations,
    strip_image_marker,
)
from miadpo.augment.runner import RECORDS_FILE, SKIPPED_FILE, run_augmentation
from miadpo.config import DataConfig, GridAugmentConfig
from miadpo.data.pairs import BadRecordError, BadRecordReport, ImageRoots

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "coins",
          "moon", "page", "clock", "brick", "colorwheel", "camera", "grass", "gravel", "retina"]
TWO_TURNS = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A photo."},
             {"from": "human", "value": "Is it Large?"}, {"from": "gpt", "value": "Yes."}]


def write_source(tmp_path: Path, n_generated: int = 0, extra: list[Any] | None = None) -> Path:
    """Real photographs (scikit-image's bundled samples) under coco/, generated ones under gqa/."""
    images = tmp_path / "images"
    (images / "coco").mkdir(parents=True, exist_ok=True)
    (images / "gqa").mkdir(parents=True, exist_ok=True)
    records: list[Any] = []
    for name in PHOTOS:
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(images / "coco" / f"{name}.jpg")
        records.append({"id": name, "image": f"coco/{name}.jpg",
                        "conversations": [{"from": "human", "value": f"<image>\nWhat is in the {name} photo?"},
                                          {"from": "gpt", "value": f"It shows {name}."}]})
    rng = np.random.default_rng(0)
    for i in range(n_generated):
        pixels = rng.integers(0, 255, size=(60 + 7 * i, 90, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / "gqa" / f"g{i}.png")
        records.append({"id": f"g{i}", "image": f"gqa/g{i}.png", "conversations": TWO_TURNS})
    records += extra or []
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def data_config(tmp_path: Path, source: Path, out: str = "out", **overrides: Any) -> DataConfig:
    cfg = OmegaConf.structured(DataConfig(source=str(source), image_root=str(tmp_path / "images"),
                                          out_dir=str(tmp_path / out), max_bad_fraction=0.5))
    cfg.merge_with(overrides)
    return cfg  # type: ignore[return-value]


def read_records(out_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out_dir / RECORDS_FILE).read_text().splitlines()]


# ----- prompt strings -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "k", "first"),
    [
        (2, 1, "Image1:<image>\nImage2:<image>\nIn Image1, what is shown?"),
        (3, 3, "Image1:<image>\nImage2:<image>\nImage3:<image>\nIn Image3, what is shown?"),
        (4, 2, "Image1:<image>\nImage2:<image>\nImage3:<image>\nImage4:<image>\nIn Image2, what is shown?"),
        (5, 5, "Image1:<image>\nImage2:<image>\nImage3:<image>\nImage4:<image>\nImage5:<image>\n"
               "In Image5, what is shown?"),
    ],
)
def test_sequence_prompt(n: int, k: int, first: str) -> None:
    turns = sequence_conversations(TWO_TURNS, n, k)
    assert turns[0]["value"] == first
    assert turns[2]["value"] == f"In image{k}, is it Large?"
    assert [t["value"] for t in turns[1::2]] == ["A photo.", "Yes."]


def test_image_marker_and_its_newline_are_removed_at_either_end() -> None:
    assert strip_image_marker("<image>\nWhat?") == "What?"
    assert strip_image_marker("What?\n<image>") == "What?"
    assert strip_image_marker("What <image> is?") == "What  is?"


@pytest.mark.parametrize("k", range(1, 10))
def test_grid_prompt(k: int) -> None:
    turns = grid_conversations([(TWO_TURNS, k)])
    assert turns[0]["value"] == f"<image>\nIn Image{k}, what is shown?"
    assert turns[2]["value"] == f"In Image{k}, is it Large?"


def test_multi_question_grid_relabels_each_record_with_its_tile() -> None:
    other = [{"from": "human", "value": "How many?\n<image>"}, {"from": "gpt", "value": "Two."}]
    turns = grid_conversations([(TWO_TURNS, 4), (other, 2)])
    assert [t["value"] for t in turns] == ["<image>\nIn Image4, what is shown?", "A photo.",
                                           "In Image4, is it Large?", "Yes.", "In Image2, how many?", "Two."]


def test_pip_prompt_and_phrases() -> None:
    assert len(PIP_PHRASES) == 90 and len(set(PIP_PHRASES)) == 90
    turns = pip_conversations(TWO_TURNS, "For the image in the center")
    assert turns[0]["value"] == "<image>\nFor the image in the center, what is shown?"
    assert turns[2]["value"] == "For the image in the center, is it Large?"


def test_refusal_asks_about_a_missing_image() -> None:
    turns = refusal_conversations(TWO_TURNS, 3)
    assert turns == [
        {"from": "human", "value": "Image1:<image>\nImage2:<image>\nImage3:<image>\nIn Image4, what is shown?"},
        {"from": "gpt", "value": "Only 3 images were given, so there is no Image4."},
    ]


def test_bbox_detection() -> None:
    assert has_bbox([{"value": "Region [0.1, 0.2, 0.5, 0.6] shows?"}])
    assert has_bbox([{"value": "[12, 30, 100, 200]"}])
    assert not has_bbox([{"value": "Options: [A, B] or 1, 2, 3"}])


# ----- grid and pic-in-pic pixels -------------------------------------------------------------------
# Hand-computed numbers: 448-px cells, 40-px column gap, 40-px label band above each row.
CANVAS = {2: (936, 488), 3: (1424, 488), 4: (936, 976), 5: (1424, 976), 6: (1424, 976), 7: (1424, 1464),
          8: (1424, 1464), 9: (1424, 1464)}
CELL_X = [0, 488, 976]
CELL_Y = [40, 528, 1016]
COLS = {2: 2, 3: 3, 4: 2, 5: 3, 6: 3, 7: 3, 8: 3, 9: 3}


@pytest.mark.parametrize("n", range(2, 10))
def test_grid_canvas_tiles_and_labels(n: int) -> None:
    # Square 100-px inputs grow to 448 × 448; the last one is 200 × 100 and becomes 448 × 224.
    inputs = [Image.new("RGB", (100, 100), (200, 30 * i, 40)) for i in range(n - 1)]
    inputs.append(Image.new("RGB", (200, 100), (20, 200, 90)))
    canvas, layout = compose_grid(inputs, GridAugmentConfig())
    assert canvas.size == CANVAS[n] and layout["canvas"] == list(CANVAS[n])
    assert (layout["rows"], layout["cols"]) == GRID_LAYOUTS[n]
    expected = []
    for i in range(n):
        x, y = CELL_X[i % COLS[n]], CELL_Y[i // COLS[n]]
        expected.append([x, y, x + 448, y + (224 if i == n - 1 else 448)])
    assert layout["tiles"] == expected
    pixels = np.asarray(canvas)
    for i, (x0, y0, x1, y1) in enumerate(layout["tiles"]):
        assert tuple(pixels[(y0 + y1) // 2, (x0 + x1) // 2]) == inputs[i].getpixel((50, 50))
    band_mask = np.zeros(pixels.shape[:2], dtype=bool)
    for row in range(layout["rows"]):
        band_mask[row * 488 : row * 488 + 40, :] = True
    for i, (x0, y0, x1, y1) in enumerate(layout["labels"]):
        assert band_mask[y0:y1, x0:x1].all(), "label outside its band"
        assert x0 - CELL_X[i % COLS[n]] >= 20
        assert (pixels[y0:y1, x0:x1].min(axis=2) < 100).sum() > 50, f"no dark text in label {i + 1}"
        band_mask[y0:y1, x0:x1] = False
    assert (pixels[band_mask] >= 250).all(), "ink outside the recorded label boxes"


def test_grid_with_real_photographs_keeps_aspect() -> None:
    rocket = Image.fromarray(skimage.data.rocket())  # 640 × 427
    canvas, layout = compose_grid([rocket, Image.fromarray(skimage.data.astronaut())], GridAugmentConfig())
    assert layout["tiles"][0] == [0, 40, 448, 40 + 299]  # 427 · 448 / 640 = 298.9
    assert layout["tiles"][1] == [488, 40, 936, 488]


@pytest.mark.parametrize(
    ("background", "target", "box"),
    [
        ((1000, 600), (400, 400), [290, 90, 710, 510]),  # 70% of width too tall → 70% of height: 420 × 420
        ((600, 1000), (200, 100), [90, 395, 510, 605]),  # 70% of width: 420 × 210
        ((451, 300), (512, 512), [120, 45, 330, 255]),  # real sizes: chelsea behind astronaut, 210 × 210
    ],
)
def test_pip_target_is_centred_at_seventy_percent(background, target, box) -> None:
    bg = Image.new("RGB", background, (0, 0, 255))
    canvas, layout = compose_pip(Image.new("RGB", target, (255, 0, 0)), bg, 0.7)
    assert canvas.size == background and layout["box"] == box
    x0, y0, x1, y1 = box
    pixels = np.asarray(canvas)
    assert (pixels[y0:y1, x0:x1] == [255, 0, 0]).all()
    assert (pixels[: y0, :] == [0, 0, 255]).all() and (pixels[:, x1:] == [0, 0, 255]).all()


# ----- planning ---------------------------------------------------------------------------------------
def test_companions_come_from_the_same_source_and_never_equal_the_target(tmp_path: Path) -> None:
    source = write_source(tmp_path, n_generated=12)
    cfg = data_config(tmp_path, source, augment={"refusal_fraction": 0.3,
                                                  "grid": {"records_per_grid": {1: 1.0, 2: 1.0, 3: 1.0}}})
    records, _ = read_llava_source(source, ImageRoots(tmp_path / "images", tmp_path / "out"), cfg.augment,
                                   BadRecordReport())
    by_id = {r.id: r for r in records}
    jobs = Planner(records, cfg, seed=3).plan()
    assert {j.format for j in jobs} == {"sequence", "grid", "pip", "refusal"}
    for job in jobs:
        assert len(set(job.inputs)) == len(job.inputs)
        assert {path.split("/")[0] for path in job.inputs} == {job.source}
        targets = job.target if isinstance(job.target, list) else [job.target]
        if job.format == "pip":
            assert job.inputs[1] == by_id[job.source_ids[0]].image
        elif job.format != "refusal":
            assert len(targets) == len(job.source_ids)
            for tile, source_id in zip(targets, job.source_ids):
                assert job.inputs[tile - 1] == by_id[source_id].image
    assert any(isinstance(j.target, list) for j in jobs), "no multi-question grid planned"


def test_bbox_records_are_kept_out_of_grid_and_pip(tmp_path: Path) -> None:
    box = {"id": "box", "image": "coco/moon.jpg",
           "conversations": [{"from": "human", "value": "<image>\nWhat is at [0.1, 0.2, 0.3, 0.4]?"},
                             {"from": "gpt", "value": "A crater."}]}
    source = write_source(tmp_path, extra=[box])
    summary = run_augmentation(data_config(tmp_path, source, formats={"sequence": 0, "grid": 1, "pip": 1}), seed=0,
                               progress=False)
    assert summary.ineligible["bounding boxes in the text (excluded from grid and pip)"] == 1
    assert "box" not in {sid for r in read_records(tmp_path / "out") for sid in r["meta"]["source_ids"]}


# ----- the stage ----------------------------------------------------------------------------------------
def snapshot(out_dir: Path) -> dict[str, bytes]:
    files = [RECORDS_FILE, SKIPPED_FILE] + [str(p.relative_to(out_dir)) for p in out_dir.glob("images/*/*")]
    return {name: (out_dir / name).read_bytes() for name in sorted(files)}


def test_same_seed_gives_byte_identical_output_for_one_or_two_workers(tmp_path: Path) -> None:
    source = write_source(tmp_path, n_generated=6)
    one = run_augmentation(data_config(tmp_path, source, "w1"), seed=7, workers=1, progress=False)
    two = run_augmentation(data_config(tmp_path, source, "w2"), seed=7, workers=2, progress=False)
    assert one.written == two.written and sum(one.written.values()) == len(PHOTOS) + 6
    assert snapshot(tmp_path / "w1") == snapshot(tmp_path / "w2")
    other = run_augmentation(data_config(tmp_path, source, "w3"), seed=8, workers=1, progress=False)
    assert snapshot(tmp_path / "w3")[RECORDS_FILE] != snapshot(tmp_path / "w1")[RECORDS_FILE]
    assert other.written  # a different seed is a different data set


def test_a_different_configuration_never_reuses_an_output_directory(tmp_path: Path) -> None:
    source = write_source(tmp_path)
    run_augmentation(data_config(tmp_path, source), seed=1, workers=1, progress=False)
    with pytest.raises(FileExistsError, match="changed: \\['seed'\\]"):
        run_augmentation(data_config(tmp_path, source), seed=2, workers=1, progress=False)
    again = run_augmentation(data_config(tmp_path, source), seed=1, workers=2, progress=False)
    assert sum(again.written.values()) == len(PHOTOS)  # same configuration: the finished output is reused


def run_cli(tmp_path: Path, source: Path, out: str, stop_after: int | None = None) -> subprocess.Popen:
    """``python -m miadpo.augment``; with ``stop_after``, ended like a kill right after that many records."""
    launch = ([sys.executable, "-m", "miadpo.augment"] if stop_after is None
              else interrupted_command("miadpo.augment", RECORDS_FILE, stop_after))
    args = [*launch, "data=grid", f"data.source={source}",
            f"data.image_root={tmp_path / 'images'}", f"data.out_dir={tmp_path / out}", "data.augment.workers=1",
            "data.augment.grid.n_weights={2:0,3:0,4:0,5:0,6:0,7:0,8:0,9:1}", "seed=5",
            f"hydra.run.dir={tmp_path / 'hydra' / out}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_output(tmp_path: Path) -> None:
    source = write_source(tmp_path, n_generated=24)
    total = len(PHOTOS) + 24
    proc = run_cli(tmp_path, source, "killed", stop_after=5)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == INTERRUPTED, err.decode()[-2000:]
    records = tmp_path / "killed" / RECORDS_FILE
    written_before = records.read_bytes().count(b"\n")
    assert 0 < written_before == 5 < total, "the run was not interrupted half-way"

    resumed = run_cli(tmp_path, source, "killed")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()[-2000:]
    assert f"resumed past {written_before} done" in out.decode()
    complete = run_cli(tmp_path, source, "complete")
    complete.communicate(timeout=300)
    assert snapshot(tmp_path / "killed") == snapshot(tmp_path / "complete")
    ids = [r["id"] for r in read_records(tmp_path / "killed")]
    assert len(ids) == len(set(ids)) == total


def test_bad_input_is_skipped_with_reasons(tmp_path: Path, caplog) -> None:
    (tmp_path / "images" / "coco").mkdir(parents=True)
    (tmp_path / "images" / "coco" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    bad = [
        {"id": "missing", "image": "coco/nope.jpg", "conversations": TWO_TURNS},
        {"id": "noimage", "image": None, "conversations": TWO_TURNS},
        {"id": "textonly", "conversations": TWO_TURNS},
        {"id": "unknown", "image": "flickr/x.jpg", "conversations": TWO_TURNS},
        {"id": "broken", "image": "coco/broken.jpg", "conversations": TWO_TURNS},
        {"id": "noanswer", "image": "coco/moon.jpg", "conversations": TWO_TURNS[:1]},
    ]
    source = write_source(tmp_path, extra=bad)
    summary = run_augmentation(data_config(tmp_path, source, formats={"sequence": 0, "grid": 0, "pip": 1}), seed=0,
                               workers=1, progress=False)
    assert summary.skipped["record without an image"] == 1
    assert summary.skipped["image not found"] == 2  # flickr/ is no known source: the file's own source, no image
    assert summary.skipped["conversations missing or shorter than one question and one answer"] == 1
    assert summary.ineligible["text-only (no image)"] == 1
    skipped = [json.loads(line) for line in (tmp_path / "out" / SKIPPED_FILE).read_text().splitlines()]
    # The corrupt photo is skipped wherever it is used: as a target or as another record's background.
    assert skipped and all(s["reason"].startswith("image corrupt or not an image: ")
                           and "coco/broken.jpg" in s["reason"] for s in skipped)
    assert sum(summary.written.values()) + len(skipped) == len(PHOTOS) + 1


def test_truncated_json_keeps_the_records_before_the_cut(tmp_path: Path) -> None:
    source = write_source(tmp_path)
    text = source.read_text()
    cut = text.index('"id": "clock"')
    source.write_text(text[:cut])  # the file ends inside the record that starts at the brace before the cut
    report = BadRecordReport(max_bad_fraction=1.0)
    records, _ = read_llava_source(source, ImageRoots(tmp_path / "images", tmp_path), DataConfig().augment, report)
    assert [r.id for r in records] == PHOTOS[: PHOTOS.index("clock")]
    assert len(report.bad) == 1 and "truncated JSON" in report.bad[0].reason
    assert report.bad[0].line == text[: text.rindex("{", 0, cut)].count("\n") + 1


def test_jsonl_sources_and_line_numbers(tmp_path: Path) -> None:
    source = write_source(tmp_path)
    lines = [json.dumps(r) for r in json.loads(source.read_text())]
    lines.insert(3, "{broken")
    jsonl = tmp_path / "llava.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    report = BadRecordReport(max_bad_fraction=1.0)
    records, _ = read_llava_source(jsonl, ImageRoots(tmp_path / "images", tmp_path), DataConfig().augment, report)
    assert len(records) == len(PHOTOS) and report.bad[0].line == 4 and "malformed JSON" in report.bad[0].reason


def test_strict_mode_stops_with_file_line_and_id(tmp_path: Path) -> None:
    source = write_source(tmp_path, extra=[{"id": "unknown", "image": "flickr/x.jpg", "conversations": TWO_TURNS}])
    with pytest.raises(BadRecordError, match=r"llava.json:\d+ \(id=unknown\): image not found: flickr/x.jpg"):
        run_augmentation(data_config(tmp_path, source, on_bad_record="error"), seed=0, progress=False)
    cfg = data_config(tmp_path, source, "strict2", on_bad_record="error", augment={"skip_text_only": False})
    source.write_text(json.dumps(json.loads(source.read_text())[:3] + [{"id": "t", "conversations": TWO_TURNS}]))
    with pytest.raises(BadRecordError, match=r"\(id=t\): record without an image"):
        run_augmentation(cfg, seed=0, progress=False)


def test_datamodule_runs_augmentation_when_output_is_missing(tmp_path: Path) -> None:
    source = write_source(tmp_path)
    module = AugmentedRecordsDataModule(data_config(tmp_path, source, batch_size=5), seed=0)
    assert not (tmp_path / "out" / RECORDS_FILE).exists()
    module.prepare_data()
    module.setup("predict")
    batches = list(module.predict_dataloader())
    assert sum(len(b) for b in batches) == len(PHOTOS) and len(batches[0]) == 5
    assert {"id", "image", "conversations", "meta"} <= set(batches[0][0])


def test_single_format_keeps_the_source_question_as_a_single_image_prompt(tmp_path: Path) -> None:
    """data.formats.single: the record as LLaVA asks it (one image, `<image>` leading the first turn)."""
    from miadpo.eval.items import llava_items
    from miadpo.select.candidates import selection_inputs

    source = write_source(tmp_path, n_generated=3)
    cfg = data_config(tmp_path, source, formats={"sequence": 1.0, "grid": 0.0, "pip": 0.0, "single": 1.0})
    run_augmentation(cfg, seed=0, progress=False)
    records = read_records(tmp_path / "out")
    single = [r for r in records if r["meta"]["format"] == "single"]
    assert single and len(single) < len(records)  # both formats drawn
    for record in single:
        assert record["image"] == record["meta"]["inputs"] and len(record["image"]) == 1
        assert record["meta"]["n_images"] == 1 and record["meta"]["target"] == 1
        first = record["conversations"][0]["value"]
        assert first.startswith("<image>\n") and first.count("<image>") == 1
    two_turns = next(r for r in single if r["id"].startswith("single") and len(r["conversations"]) == 4)
    assert [t["value"] for t in two_turns["conversations"]] == ["<image>\nWhat is shown?", "A photo.", "Is it Large?",
                                                                "Yes."]
    inputs, skipped = selection_inputs(records, max_answer_chars=512)
    assert not skipped and {i.format for i in inputs} == {"sequence", "single"}
    groups = {item.group for item in llava_items(tmp_path / "out" / RECORDS_FILE, ImageRoots.of(cfg))}
    assert "single" in groups and not any(g.startswith("single N=") for g in groups)  # not a multi-image group


@pytest.mark.parametrize("layout", ["{name}.jpg", "photos/2024/{name}.jpg", "train2017/{name}.jpg"])
def test_an_image_folder_of_any_layout_augments_as_one_source(tmp_path: Path, layout: str) -> None:
    """Flat, nested and COCO-style folders of one's own (first folder no LLaVA-665k dataset): the whole file is one
    source, so companions are drawn from all of it (issue 32; this was "unknown source" for every record)."""
    records = []
    for name in PHOTOS[:8]:
        path = tmp_path / "images" / layout.format(name=name)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(path)
        records.append({"id": name, "image": layout.format(name=name),
                        "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"},
                                          {"from": "gpt", "value": name}]})
    source = tmp_path / "my_photos.json"
    source.write_text(json.dumps(records))
    cfg = data_config(tmp_path, source, formats={"sequence": 1.0, "grid": 0.0, "pip": 0.0}, on_bad_record="error")
    summary = run_augmentation(cfg, seed=0, workers=1, progress=False)
    written = read_records(tmp_path / "out")
    assert sum(summary.written.values()) == len(written) == 8 and not summary.skipped
    assert {r["meta"]["source"] for r in written} == {"my_photos"}
    assert all(len(set(r["image"])) == r["meta"]["n_images"] >= 2 for r in written)


def test_known_dataset_folders_stay_their_own_sources(tmp_path: Path) -> None:
    source = write_source(tmp_path, n_generated=4)
    run_augmentation(data_config(tmp_path, source, formats={"sequence": 1.0, "grid": 0.0, "pip": 0.0}), seed=0,
                     workers=1, progress=False)
    for record in read_records(tmp_path / "out"):
        assert record["meta"]["source"] in ("coco", "gqa")
        assert {Path(image).parts[0] for image in record["image"]} == {record["meta"]["source"]}


def test_a_failed_augmentation_does_not_block_the_corrected_rerun(tmp_path: Path) -> None:
    """Every record bad (wrong image root): the run fails; the corrected run (another configuration) goes ahead in
    the same directory, where it was refused as "output of another configuration" (issue 32)."""
    source = write_source(tmp_path)
    wrong = data_config(tmp_path, source, formats={"sequence": 1.0, "grid": 0.0, "pip": 0.0})
    wrong.image_root = str(tmp_path / "nowhere")
    with pytest.raises(BadRecordError):
        run_augmentation(wrong, seed=0, workers=1, progress=False)
    assert (tmp_path / "out" / "augment_manifest.json").is_file()
    fixed = data_config(tmp_path, source, formats={"sequence": 1.0, "grid": 0.0, "pip": 0.0})
    fixed.augment.max_records = 10  # another configuration than the failed one
    summary = run_augmentation(fixed, seed=0, workers=1, progress=False)
    assert sum(summary.written.values()) == 10
    # A directory with written records still refuses another configuration.
    fixed.augment.max_records = 12
    with pytest.raises(FileExistsError, match="another configuration"):
        run_augmentation(fixed, seed=0, workers=1, progress=False)


def test_every_written_line_is_a_typed_augmented_record_that_writes_back_byte_for_byte(tmp_path: Path) -> None:
    """``records.jsonl`` lines are ``AugmentedRecord``s (meta typed, negative where built): read and written back,
    each is the same bytes; a line that is not one stops selection naming the file, line and what is missing."""
    from miadpo.augment.records import AugmentedRecord
    from miadpo.select.candidates import selection_inputs

    source = write_source(tmp_path, n_generated=12)
    cfg = data_config(tmp_path, source, augment={"refusal_fraction": 0.3, "negatives": {"kind": "companion"},
                                                 "grid": {"records_per_grid": {1: 1.0, 2: 1.0}}},
                      formats={"sequence": 1.0, "grid": 1.0, "pip": 1.0, "single": 1.0})
    run_augmentation(cfg, seed=5, progress=False)
    lines = (tmp_path / "out" / RECORDS_FILE).read_text().splitlines()
    records = [AugmentedRecord.from_json(json.loads(line)) for line in lines]
    assert [json.dumps(r.to_json(), ensure_ascii=False) for r in records] == lines
    assert {r.meta.format for r in records} == {"sequence", "grid", "pip", "single", "refusal"}
    assert any(r.rejected_images is not None and r.meta.negative for r in records)
    broken = [json.loads(line) for line in lines[:3]]
    del broken[2]["meta"]["n_images"]
    with pytest.raises(ValueError, match=rf"{RECORDS_FILE}:3 \(id={broken[2]['id']}\): not an augmented record"):
        selection_inputs(broken, 512)
