"""Images: one loader (``miadpo.data.images``) with every rule, and unusable images as bad records in every stage
(training, SFT, selection, evaluation, generate)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from omegaconf import OmegaConf
from PIL import Image
from reliability import case

from miadpo import evaluate
from miadpo.augment.formats import sequence_conversations
from miadpo.config import DataConfig, EvalJobConfig, SelectionConfig, SFTDataConfig
from miadpo.data import images
from miadpo.data.dataset import PairDataModule, PairDataset
from miadpo.data.pairs import BadRecordError, BadRecordReport, ImageRoots, PairRecord
from miadpo.dpo.forward import ConcatenatedPairForward
from miadpo.eval.items import llava_items, tsv_items
from miadpo.generate import answer
from miadpo.select.candidates import CandidateGenerator, SelectionInput, selection_inputs
from miadpo.sft import SFTDataset, read_sft_records, sft_loaders

QUESTION = [{"from": "human", "value": "<image>\nWhat colour is the box?"}, {"from": "gpt", "value": "Red."}]


def write_image(path: Path, kind: str = "good", size: tuple[int, int] = (32, 32)) -> None:
    """A small image file: good, missing (nothing written), not an image, or truncated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "good":
        Image.new("RGB", size, (200, 30, 60)).save(path)
    elif kind == "not an image":
        path.write_text("this is no image\n")
    elif kind == "truncated":
        Image.effect_noise(size, 60).convert("RGB").save(path, format="JPEG")
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        assert kind == "missing"


def llava_jsonl(tmp_path: Path, kinds: list[str], name: str = "records.jsonl") -> Path:
    """Single-image LLaVA records r0, r1, ... one a line, record i's image of the given kind."""
    lines = []
    for i, kind in enumerate(kinds):
        write_image(tmp_path / "images" / f"r{i}.jpg", kind)
        lines.append(json.dumps({"id": f"r{i}", "image": f"r{i}.jpg", "conversations": QUESTION}))
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


class CapturingAdapter:
    """Returns the images it is given where an adapter would return processed tensors."""

    model = SimpleNamespace(eval=lambda: None)

    def process_images(self, pictures: list[Image.Image]) -> list[Image.Image]:
        return pictures

    def encode(self, pictures: list[Image.Image], *args: Any) -> list[Image.Image]:
        return pictures

    def generate_answers(self, samples: list[Any], *args: Any, **kwargs: Any) -> list[Any]:
        return samples


# ----- the loader's rules -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, suffix, value, expected", [
    case("images", "16-bit-greyscale", "a 16-bit greyscale PNG (mode I;16): mid-grey came out 99.6% white",
         "scaled to 8 bits by the mode's range (÷257): mid-grey stays mid-grey", "I;16", "png", 32768, 128),
    case("images", "16-bit-big-endian-greyscale", "a big-endian 16-bit greyscale TIFF (mode I;16B)",
         "scaled to 8 bits (÷257), as I;16", "I;16B", "tiff", 32768, 128),
    case("images", "32-bit-integer-greyscale", "a 32-bit integer greyscale TIFF (mode I, Pillow's mode for 16-bit "
         "data too)", "read as 16-bit: clipped to 0–65535, ÷257", "I", "tiff", 16448, 64),
])
def test_high_bit_depth_greyscale_is_scaled_to_8_bits(tmp_path: Path, mode: str, suffix: str, value: int,
                                                      expected: int) -> None:
    path = tmp_path / f"grey.{suffix}"
    Image.new(mode, (8, 6), value).save(path)
    image = images.load_image(path)
    assert image.mode == "RGB" and image.size == (8, 6)
    assert image.getpixel((3, 3)) == (expected, expected, expected)


@pytest.mark.parametrize("make, expected", [
    case("images", "transparent-rgba", "an RGBA PNG, half-transparent red", "composited on white: (255, 127, 127), "
         "not red", lambda: Image.new("RGBA", (6, 6), (255, 0, 0, 128)), (255, 127, 127)),
    case("images", "transparent-grey-alpha", "a greyscale + alpha PNG (LA), fully transparent",
         "composited on white: white, not black", lambda: Image.new("LA", (6, 6), (0, 0)), (255, 255, 255)),
    case("images", "palette-transparency", "a palette PNG (P) whose colour is the transparent entry",
         "composited on white: white, not the palette colour",
         lambda: Image.new("P", (6, 6), 0), (255, 255, 255)),
])
def test_transparency_is_composited_on_white(tmp_path: Path, make: Any, expected: tuple[int, int, int]) -> None:
    image = make()
    path = tmp_path / "alpha.png"
    image.save(path, transparency=0) if image.mode == "P" else image.save(path)
    loaded = images.load_image(path)
    assert loaded.mode == "RGB"
    assert all(abs(a - b) <= 1 for a, b in zip(loaded.getpixel((2, 2)), expected))


@pytest.mark.parametrize("orientation, size", [
    case("images", "exif-rotated-photo", "a JPEG stored sideways with EXIF orientation 6 (rotate 90°)",
         "turned upright (the EXIF orientation applied) in every stage; its size is the upright one", 6, (20, 40)),
])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, size: tuple[int, int]) -> None:
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 40, 6))  # a red band along the stored top edge
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "sideways.jpg"
    stored.save(path, exif=exif, quality=95)
    upright = images.load_image(path)
    assert upright.size == size and images.image_size(path) == size
    right, left = upright.getpixel((size[0] - 2, 20)), upright.getpixel((1, 20))
    assert right[0] > 200 and right[2] < 60 and left[2] > 200  # the top edge, turned 90° clockwise, is on the right


@pytest.mark.parametrize("suffix", [
    case("images", "over-pixel-cap", "an image above data.max_image_pixels (default 40 MP; a 12000×12000 photo took "
         "132 s and 3.15 GB for 4 pairs)", "downsized to fit, aspect kept (JPEG decoded at a reduced scale first), "
         "counted and logged once per file", "jpg"),
])
def test_image_above_the_pixel_cap_is_downsized(tmp_path: Path, caplog: pytest.LogCaptureFixture, suffix: str) -> None:
    path = tmp_path / f"big.{suffix}"
    Image.new("RGB", (400, 300), (10, 200, 30)).save(path)
    options = images.ImageOptions(max_pixels=10_000)
    before = images.COUNTS["downsized"]
    with caplog.at_level(logging.WARNING, logger="miadpo.data.images"):
        loaded = images.load_image(path, options)
        again = images.load_image(path, options)
    width, height = loaded.size
    assert width * height <= 10_000 and width * height > 9_000 and abs(width / height - 4 / 3) < 0.02
    assert again.size == loaded.size == images.image_size(path, options)
    assert images.COUNTS["downsized"] == before + 1 and caplog.text.count("downsized") == 1
    assert images.load_image(path).size == (400, 300)  # under the default cap: as stored


@pytest.mark.parametrize("limit", [
    case("images", "decompression-bomb", "an image above twice PIL's decompression-bomb limit (~179 MP; PIL's error "
         "named no file)", "an error naming the file and 'too large', whatever data.on_large_image", 100),
])
def test_image_above_pils_limit_is_too_large_whatever_the_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 limit: int) -> None:
    path = tmp_path / "bomb.png"
    Image.new("RGB", (30, 10), (1, 2, 3)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)  # 300 pixels > 2 × limit: PIL refuses to decode it
    with pytest.raises(images.ImageError, match=rf"^image too large: {path} — DecompressionBombError"):
        images.load_image(path)


@pytest.mark.parametrize("kind, reason", [
    case("images", "missing-image", "a record path whose file does not exist (the error named only the relative path)",
         "an error naming the resolved path, the root searched and 'missing'", "missing", "image missing"),
    case("images", "not-an-image", "a file that is not an image (text named .jpg)",
         "an error naming the resolved path, the root searched and 'corrupt or not an image'", "not an image",
         "image corrupt or not an image"),
    case("images", "truncated-image", "a JPEG cut short", "an error naming the resolved path, the root searched and "
         "'truncated'", "truncated", "image truncated"),
])
def test_unusable_image_errors_name_path_root_and_reason(tmp_path: Path, kind: str, reason: str) -> None:
    roots = ImageRoots(tmp_path / "photos", tmp_path / "out")
    write_image(tmp_path / "photos" / "coco" / "x.jpg", kind)
    with pytest.raises(images.ImageError) as error:
        images.load_record_image(roots, "coco/x.jpg")
    message = str(error.value)
    assert message.startswith(f"{reason}: {(tmp_path / 'photos' / 'coco' / 'x.jpg').resolve()}")
    assert f"image_root={(tmp_path / 'photos').resolve()}" in message
    assert error.value.kind == reason.removeprefix("image ")


@pytest.mark.parametrize("value", [
    case("images", "one-loader-every-stage", "a 16-bit greyscale photo read by training, SFT, selection, evaluation "
         "and generate", "the same 8-bit RGB image in each (one loader, miadpo.data.images)", 32768),
])
def test_every_stage_loads_through_the_one_loader(tmp_path: Path, adapter, value: int) -> None:
    Image.new("I;16", (8, 8), value).save(tmp_path / "grey.png")
    roots = ImageRoots(tmp_path, tmp_path)
    record = PairRecord("p", ["grey.png"], "<image>\nWhat?", "Grey.", "White.")
    seen = {
        "training": PairDataset([record], roots, CapturingAdapter(), 64)[0].chosen,
        "sft": SFTDataset([record], roots, CapturingAdapter(), 64)[0],
        "generate": answer(CapturingAdapter(), [str(tmp_path / "grey.png")], "What?"),
        "selection": CandidateGenerator(adapter, OmegaConf.structured(SelectionConfig), roots, 0)._images(
            SelectionInput("p", "single", 1, 1, ("grey.png",), "<image>\nWhat?", "Grey.", None)),
    }
    (tmp_path / "eval.jsonl").write_text(json.dumps({"id": "e", "image": "grey.png", "conversations": QUESTION}))
    seen["evaluation"] = llava_items(tmp_path / "eval.jsonl", roots)[0].load_images()
    assert {stage: [im.getpixel((4, 4)) for im in pics] for stage, pics in seen.items()} == {
        stage: [(128, 128, 128)] for stage in seen}


# ----- training -----------------------------------------------------------------------------------------
def pair_file(tmp_path: Path, kinds: list[str], sizes: list[tuple[int, int]] | None = None) -> Path:
    lines = []
    for i, kind in enumerate(kinds):
        write_image(tmp_path / "images" / f"p{i}.png", kind, (sizes or [(32, 32)] * len(kinds))[i])
        lines.append(json.dumps({"id": f"pair-{i}", "images": [f"p{i}.png"], "prompt": "<image>\nWhat colour?",
                                 "chosen": "Red.", "rejected": "Blue."}))
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def train_data(tmp_path: Path, pairs: Path, **overrides: Any) -> DataConfig:
    values = {"pairs": str(pairs), "image_root": str(tmp_path / "images"), "out_dir": str(tmp_path / "out"),
              "val_fraction": 0.0, "batch_size": 8, "max_bad_fraction": 0.5}
    return OmegaConf.structured(DataConfig(**{**values, **overrides}))  # type: ignore[return-value]


@pytest.mark.parametrize("overrides, reason", [
    case("training", "pair-image-too-large-skip", "a pair image above data.max_image_pixels with "
         "data.on_large_image=skip", "that pair is a bad record at setup (file:line (id): image too large ...), "
         "counted; the rest trains", {"max_image_pixels": 2000, "on_large_image": "skip"}, "image too large"),
    case("training", "pair-image-missing-unchecked", "a pair image missing, with data.check_images=false (the run "
         "crashed without naming the pair)", "a bad record at setup (file:line (id): image missing ..., the root "
         "searched), counted; the rest trains", {"check_images": False}, "image missing"),
])
def test_pair_with_an_unusable_image_is_a_bad_record_at_setup(adapter, tmp_path: Path, overrides: dict[str, Any],
                                                              reason: str) -> None:
    kind = "missing" if reason == "image missing" else "good"
    path = pair_file(tmp_path, ["good", "good", kind, "good"], [(32, 32), (32, 32), (100, 100), (32, 32)])
    module = PairDataModule(train_data(tmp_path, path, **overrides), adapter, ConcatenatedPairForward(adapter).collate)
    module.setup("fit")
    assert [r.id for r in module.train_set.records] == ["pair-0", "pair-1", "pair-3"]
    assert [(b.file, b.line, b.id) for b in module.report.bad] == [(str(path), 3, "pair-2")]
    assert module.report.bad[0].reason.startswith(reason)
    next(iter(module.train_dataloader()))


@pytest.mark.parametrize("size", [
    case("images", "extreme-aspect-ratio", "a 1×20000 PNG (161 bytes): padded to a 20000² canvas, LLaVA's generate "
         "peaked at 5.9 GB (1×40000 would be killed with no message); Qwen2-VL / GLM-4V's resize raised unnamed",
         "a bad record in every stage that loads images (file:line (id): image too elongated ... aspect ratio of "
         "20000:1 > max_image_aspect_ratio=100), found from the header before any pixel is decoded; "
         "data/sft/eval.max_image_aspect_ratio raises the limit", (1, 20000)),
    (3000, 20),
])
def test_an_extremely_elongated_image_is_a_bad_record_in_training_and_evaluation(adapter, tmp_path: Path,
                                                                                  size: tuple[int, int]) -> None:
    path = pair_file(tmp_path, ["good", "good", "good"], [(32, 32), size, (32, 32)])
    module = PairDataModule(train_data(tmp_path, path), adapter, ConcatenatedPairForward(adapter).collate)
    module.setup("fit")
    assert [r.id for r in module.train_set.records] == ["pair-0", "pair-2"]
    (bad,) = module.report.bad
    ratio = max(size) // min(size)
    assert (bad.line, bad.id) == (2, "pair-1") and bad.reason.startswith("image too elongated: ")
    assert f"aspect ratio of {ratio}:1 > max_image_aspect_ratio=100" in bad.reason
    raised = PairDataModule(train_data(tmp_path, path, max_image_aspect_ratio=ratio + 1), adapter,
                            ConcatenatedPairForward(adapter).collate)
    raised.setup("fit")
    assert len(raised.train_set.records) == 3  # the named setting lets it through

    (tmp_path / "images" / "r1.jpg").parent.mkdir(exist_ok=True)
    records = llava_jsonl(tmp_path, ["good", "good"])
    Image.new("RGB", size, (1, 2, 3)).save(tmp_path / "images" / "r1.jpg")
    results = evaluate.run_evaluation(eval_config(tmp_path, files=[str(records)]))
    (skipped,) = results["skipped"]
    assert skipped.startswith(f"{records}:2 (id=r1): image too elongated: ")


# ----- SFT ----------------------------------------------------------------------------------------------
def sft_data(tmp_path: Path, files: list[Path], **overrides: Any) -> SFTDataConfig:
    cfg = OmegaConf.structured(SFTDataConfig)
    cfg.merge_with({"files": [str(f) for f in files], "image_root": str(tmp_path / "images"),
                    "out_dir": str(tmp_path), "batch_size": 2, "max_length": 128, "max_bad_fraction": 0.5,
                    **overrides})
    return cfg  # type: ignore[return-value]


@pytest.mark.parametrize("kind", [
    case("SFT", "sft-missing-image", "an SFT record whose image is missing (SFT crashed mid-epoch with a bare "
         "FileNotFoundError)", "a bad record at load (file:line (id): image missing ...), counted under "
         "data.on_bad_record=skip; the epoch never meets it", "missing"),
    case("SFT", "sft-truncated-image", "an SFT record whose image is truncated", "a bad record at load (file:line "
         "(id): image truncated ...), counted; the epoch never meets it", "truncated"),
])
def test_sft_record_with_an_unusable_image_is_skipped_at_load(adapter, tmp_path: Path, kind: str) -> None:
    path = llava_jsonl(tmp_path, ["good", kind, "good", "good"])
    data = sft_data(tmp_path, [path])
    report = BadRecordReport(data.on_bad_record, data.max_bad_fraction, stage="sft")
    records = read_sft_records([str(path)], ImageRoots.of(data), report)
    assert [r.id for r in records] == ["r0", "r2", "r3"]
    assert [(b.file, b.line, b.id) for b in report.bad] == [(str(path), 2, "r1")]
    assert report.bad[0].reason.startswith(f"image {kind}: {(tmp_path / 'images' / 'r1.jpg').resolve()}")
    loader, _ = sft_loaders(adapter, data, seed=0)
    assert sum(batch["input_ids"].shape[0] for batch in loader) == 3


@pytest.mark.parametrize("kind", [
    case("SFT", "sft-missing-image-error", "an SFT record whose image is missing, with data.on_bad_record=error",
         "SFT stops at load, naming file:line (id) and the missing image", "missing"),
])
def test_sft_missing_image_stops_at_load_under_error_policy(adapter, tmp_path: Path, kind: str) -> None:
    path = llava_jsonl(tmp_path, ["good", kind])
    with pytest.raises(BadRecordError, match=rf"records\.jsonl:2 \(id=r1\): image {kind}: .*r1\.jpg"):
        sft_loaders(adapter, sft_data(tmp_path, [path], on_bad_record="error"), seed=0)


# ----- selection ----------------------------------------------------------------------------------------
def augmented_records(tmp_path: Path, kinds: list[str]) -> list[dict[str, Any]]:
    records = []
    for i, kind in enumerate(kinds):
        paths = [f"s{i}_0.png", f"s{i}_1.png"]
        write_image(tmp_path / "images" / paths[0], "good")
        write_image(tmp_path / "images" / paths[1], kind)
        records.append({"id": f"seq-{i}", "image": paths, "conversations": sequence_conversations(QUESTION, 2, 2),
                        "meta": {"format": "sequence", "n_images": 2, "target": 2}})
    return records


def selection_data(tmp_path: Path, **overrides: Any) -> DataConfig:
    cfg = OmegaConf.structured(DataConfig(image_root=str(tmp_path / "images"), out_dir=str(tmp_path / "out"),
                                          max_bad_fraction=0.5))
    cfg.merge_with(overrides)
    return cfg  # type: ignore[return-value]


@pytest.mark.parametrize("kind", [
    case("selection", "selection-missing-image", "an augmented record whose image is missing (selection crashed "
         "mid-generation)", "a bad record before generation (records.jsonl:line (id): image missing ...), counted "
         "among the records not selected on; the others are answered", "missing"),
    case("selection", "selection-corrupt-image", "an augmented record whose image is not an image",
         "a bad record before generation (image corrupt or not an image), counted; the others are answered",
         "not an image"),
])
def test_selection_skips_a_record_with_an_unusable_image(adapter, tmp_path: Path, kind: str, caplog) -> None:
    records = augmented_records(tmp_path, ["good", kind, "good"])
    data = selection_data(tmp_path)
    with caplog.at_level(logging.WARNING):
        inputs, skipped = selection_inputs(records, 512, data)
    reason = "image missing" if kind == "missing" else "image corrupt or not an image"
    assert [item.id for item in inputs] == ["seq-0", "seq-2"] and skipped == {reason: 1}
    assert f"records.jsonl:2 (id=seq-1): {reason}: {(tmp_path / 'images' / 's1_1.png').resolve()}" in caplog.text
    cfg = OmegaConf.structured(SelectionConfig)
    cfg.generation.max_new_tokens = 2
    candidates = CandidateGenerator(adapter, cfg, ImageRoots.of(data), 0)(inputs)
    assert [c.id for c in candidates] == ["seq-0", "seq-2"]


@pytest.mark.parametrize("kind", [
    case("selection", "selection-missing-image-error", "an augmented record whose image is missing, with "
         "data.on_bad_record=error", "selection stops before generating, naming records.jsonl:line (id) and the image",
         "missing"),
])
def test_selection_stops_on_a_missing_image_under_error_policy(tmp_path: Path, kind: str) -> None:
    records = augmented_records(tmp_path, ["good", kind])
    with pytest.raises(BadRecordError, match=r"records\.jsonl:2 \(id=seq-1\): image missing: .*s1_1\.png"):
        selection_inputs(records, 512, selection_data(tmp_path, on_bad_record="error"))


# ----- evaluation ---------------------------------------------------------------------------------------
def eval_config(tmp_path: Path, **overrides: Any) -> EvalJobConfig:
    cfg = OmegaConf.structured(EvalJobConfig)
    cfg.model.name = "tiny_llava"
    cfg.run_dir = str(tmp_path / "run")
    cfg.eval.merge_with({"image_root": str(tmp_path / "images"), "out_dir": str(tmp_path), "max_new_tokens": 2,
                         "max_bad_fraction": 0.5, **overrides})
    return cfg  # type: ignore[return-value]


def tsv_with_image_paths(tmp_path: Path, kinds: list[str]) -> Path:
    lines = ["index\tquestion\tA\tB\tanswer\timage_path"]
    for i, kind in enumerate(kinds):
        write_image(tmp_path / "bench" / f"t{i}.png", kind)
        lines.append(f"{i}\tColour?\tred\tblue\tA\tt{i}.png")
    path = tmp_path / "bench" / "bench.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("source", [
    case("evaluation", "eval-missing-image", "a test record (eval.files) whose image is missing (evaluation "
         "crashed)", "skipped, counted and logged; listed under 'skipped' in eval.json (file:line (id): reason); the "
         "rest is scored", "files"),
    case("evaluation", "eval-tsv-missing-image-file", "a TSV row whose image_path file is missing", "skipped, "
         "counted and logged; listed under 'skipped' in eval.json (file:row (index): reason); the rest is scored",
         "tsv"),
])
def test_evaluation_skips_and_reports_a_record_with_a_missing_image(tmp_path: Path, source: str) -> None:
    if source == "files":
        path = llava_jsonl(tmp_path, ["good", "missing", "good"])
        cfg, where = eval_config(tmp_path, files=[str(path)]), f"{path}:2 (id=r1): image missing"
    else:
        path = tsv_with_image_paths(tmp_path, ["good", "good", "missing"])
        cfg, where = eval_config(tmp_path, tsv=[str(path)]), f"{path}:4 (id=2): image missing"
    results = evaluate.run_evaluation(cfg)
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["skipped"] == results["skipped"] and len(saved["skipped"]) == 1
    assert saved["skipped"][0].startswith(where)
    assert sum(map(len, saved["predictions"].values())) == 2 and sum(row["n"] for row in saved["table"].values()) == 2


@pytest.mark.parametrize("source", [
    case("evaluation", "eval-missing-image-error", "a missing image with eval.on_bad_record=error",
         "the evaluation stops before generating, naming file:line (id) and the image", "files"),
])
def test_evaluation_stops_on_a_missing_image_under_error_policy(tmp_path: Path, source: str) -> None:
    path = llava_jsonl(tmp_path, ["good", "missing"])
    with pytest.raises(BadRecordError, match=r"records\.jsonl:2 \(id=r1\): image missing: .*r1\.jpg"):
        evaluate.run_evaluation(eval_config(tmp_path, files=[str(path)], on_bad_record="error"))
    tsv = tsv_with_image_paths(tmp_path, ["good", "missing"])
    with pytest.raises(BadRecordError, match=r"bench\.tsv:3 \(id=1\): image missing"):
        tsv_items(tsv, BadRecordReport("error", stage="eval"))


# ----- generate -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [
    case("generate", "generate-truncated-image", "python -m miadpo.generate with a truncated image (the message named "
         "no file)", "an error naming the file and the reason ('image truncated: <path>')", "truncated"),
])
def test_generate_names_the_unusable_image(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "photo.jpg"
    write_image(path, kind)
    with pytest.raises(images.ImageError, match=rf"image {kind}: {path}"):
        answer(CapturingAdapter(), [str(path)], "What?")
