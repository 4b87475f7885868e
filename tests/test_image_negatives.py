"""Image-side negatives: built at augmentation, carried into pairs and exports, the conditional and anchor terms, their
fast path and their reference-cache rows."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import REPO, colour_image, compose_train, good_record
from omegaconf import OmegaConf
from PIL import Image, ImageChops
from test_augment import data_config, read_records, write_source
from test_fast_path import adapter_for, pairs, step
from test_select import CPU, selection_config

from miadpo.augment.runner import fingerprint, run_augmentation
from miadpo.config import DPOConfig, OptimConfig, TooLongPolicy
from miadpo.data.dataset import EncodedPair, PairDataset, apply_length_guard
from miadpo.data.pairs import BadRecordError, BadRecordReport, ImageRoots, pair_key, parse_pair, read_pairs
from miadpo.dpo.batch import PairLogps
from miadpo.dpo.forward import ConcatenatedPairForward, SharedPrefixPairForward
from miadpo.dpo.losses import AnchorLoss, ConditionalPreferenceLoss
from miadpo.dpo.module import DPOModule
from miadpo.dpo.reference import CachedReference
from miadpo.dpo.reference_cache import InStepFilling, ReferenceCache, logps_rows
from miadpo.select.stage import run_selection
from miadpo.train import train

SMALL_GRID = {"cell_size": 64, "gap": 8, "band": 16, "font_size": 10}
ALL_FORMATS = {"sequence": 1.0, "grid": 1.0, "pip": 1.0, "single": 1.0}
JPEG_BLOCK = 16  # a 4:2:0 JPEG re-encodes whole 16 × 16 blocks: the ones straddling the changed region differ


def augment(tmp_path: Path, kind: str, out: str = "out", workers: int = 1) -> list[dict[str, Any]]:
    source = tmp_path / "llava.json"
    if not source.is_file():
        write_source(tmp_path, n_generated=6)
    cfg = data_config(tmp_path, source, out, formats=ALL_FORMATS, augment={
        "negatives": {"kind": kind}, "grid": SMALL_GRID, "workers": workers, "chunk_size": 2, "known_sources": []})
    run_augmentation(cfg, 3, progress=False)
    return read_records(tmp_path / out)


def pixels(tmp_path: Path, out: str, rel: str) -> Image.Image:
    roots = ImageRoots(tmp_path / "images", tmp_path / out)
    return Image.open(roots.resolve(rel)).convert("RGB")


def within(bbox: tuple[int, int, int, int] | None, region: list[int], margin: int = JPEG_BLOCK) -> bool:
    x0, y0, x1, y1 = region
    return bbox is not None and bbox[0] >= x0 - margin and bbox[1] >= y0 - margin and bbox[2] <= x1 + margin \
        and bbox[3] <= y1 + margin


# ----- augmentation ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["replace", "companion", "noise"])
def test_negatives_are_deterministic_and_change_only_the_target(tmp_path: Path, kind: str) -> None:
    records = augment(tmp_path, kind)
    again = augment(tmp_path, kind, out="again", workers=2)
    assert records == again  # the same records, negatives included, for the same (seed, record id), any workers
    plain = augment(tmp_path, "none", out="plain")
    assert [{k: v for k, v in r.items() if k != "rejected_image"} | {"meta": {k: v for k, v in r["meta"].items()
            if k != "negative"}} for r in records] == plain  # the records themselves are those of a run without
    formats = {r["meta"]["format"] for r in records if "rejected_image" in r}
    assert formats == {"sequence", "single", "grid", "pip"}
    for record in (r for r in records if "rejected_image" in r):
        meta, image, negative = record["meta"], record["image"], record["rejected_image"]
        assert meta["negative"]["kind"] == kind
        if kind == "companion" and meta["format"] != "single":  # one of the record's other images
            target_path = meta["inputs"][1 if meta["format"] == "pip" else (
                meta["target"] if isinstance(meta["target"], int) else meta["target"][0]) - 1]
            assert meta["negative"]["replacement"] in meta["inputs"]
            assert meta["negative"]["replacement"] != target_path
        if isinstance(image, list):  # sequence, single: only the target's path changes
            target = meta["target"] - 1
            assert len(negative) == len(image)
            assert [p for i, p in enumerate(negative) if i != target] == [p for i, p in enumerate(image) if i != target]
            assert negative[target] != image[target]
            if kind == "replace" or (kind == "companion" and meta["format"] == "single"):
                assert negative[target] == meta["negative"]["replacement"] not in image
                assert negative[target].split("/")[0] == image[target].split("/")[0]  # the same source
            diff = ImageChops.difference(pixels(tmp_path, "out", image[target]),
                                         pixels(tmp_path, "out", negative[target]).resize(
                                             pixels(tmp_path, "out", image[target]).size))
            assert diff.getbbox() is not None  # other pixels
            again_pixels = np.asarray(pixels(tmp_path, "again", again[records.index(record)]["rejected_image"][target]))
            assert np.array_equal(np.asarray(pixels(tmp_path, "out", negative[target])), again_pixels)
            continue
        original, changed = pixels(tmp_path, "out", image), pixels(tmp_path, "out", negative)
        assert original.size == changed.size
        if meta["format"] == "grid":
            x, y = meta["layout"]["tiles"][(meta["target"] if isinstance(meta["target"], int)
                                            else meta["target"][0]) - 1][:2]
            region = [x, y, x + SMALL_GRID["cell_size"], y + SMALL_GRID["cell_size"]]
        else:
            region = meta["layout"]["box"]
        bbox = ImageChops.difference(original, changed).getbbox()
        assert within(bbox, region), (meta["format"], bbox, region)
        assert np.array_equal(np.asarray(changed), np.asarray(pixels(tmp_path, "again", negative)))


def test_a_replacement_with_the_target_pixels_is_not_drawn(tmp_path: Path) -> None:
    """Two photographs of one source with equal pixels: neither is the other's negative (none is built)."""
    images = tmp_path / "images" / "toy"
    images.mkdir(parents=True)
    records = []
    for i in range(2):
        colour_image((32, 32), (200, 10, 10)).save(images / f"same{i}.png")
        records.append({"id": f"s{i}", "image": f"toy/same{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]})
    source = tmp_path / "llava.json"
    source.write_text(json.dumps(records))
    cfg = data_config(tmp_path, source, formats={"single": 1.0},
                      augment={"negatives": {"kind": "replace"}, "workers": 1, "known_sources": []})
    run_augmentation(cfg, 0, progress=False)
    assert [("rejected_image" in r) for r in read_records(tmp_path / "out")] == [False, False]


def test_negatives_off_keep_the_fingerprint_of_earlier_versions(tmp_path: Path) -> None:
    source = write_source(tmp_path)
    off = fingerprint(data_config(tmp_path, source), 0)
    assert "negatives" not in off["augment"]  # an output made before image negatives existed is still finished
    on = fingerprint(data_config(tmp_path, source, augment={"negatives": {"kind": "noise"}}), 0)
    assert on["fingerprint"] != off["fingerprint"]


# ----- selection and the pair record -------------------------------------------------------------------------------
def test_selection_carries_the_negatives_into_pairs_and_exports(adapter, tmp_path: Path) -> None:
    augment(tmp_path, "replace")
    data = data_config(tmp_path, tmp_path / "llava.json", formats=ALL_FORMATS, augment={
        "negatives": {"kind": "replace"}, "grid": SMALL_GRID, "workers": 1, "known_sources": []})
    formats = ("sequence", "grid", "pip", "single")  # every wrong answer kept: ratio <= 1
    selection = selection_config(generation={"max_new_tokens": 6}, min_perplexity=0.0,
                                 thresholds={f: {n: 1.0 for n in range(1, 10)} for f in formats},
                                 operators=dict.fromkeys(formats, "<="))
    pairs_path = run_selection(adapter, data, selection, 3, CPU)
    by_id = {r["id"]: r for r in read_records(tmp_path / "out")}
    rows = [json.loads(line) for line in pairs_path.read_text().splitlines()]
    assert rows and all("rejected_images" in row for row in rows if "rejected_image" in by_id[row["id"]])
    for row in rows:
        negative = by_id[row["id"]].get("rejected_image")
        assert row.get("rejected_images") == (None if negative is None else
                                              negative if isinstance(negative, list) else [negative])
    pairs = read_pairs(pairs_path, ImageRoots.of(data), BadRecordReport())
    assert any(p.rejected_images for p in pairs)
    out = pairs_path.parent
    trl = [json.loads(line) for line in (out / "trl.jsonl").read_text().splitlines()]
    factory = json.loads((out / "llamafactory.json").read_text())
    for row, t, f in zip(rows, trl, factory):
        if "rejected_images" not in row:
            assert "rejected_images" not in t and "rejected_images" not in f
            continue
        assert t["rejected_images"] == f["rejected_images"] and len(t["rejected_images"]) == len(t["images"])
        assert all((out / p).is_file() for p in t["rejected_images"])
        assert t["rejected_images"] != t["images"]


def test_pair_record_rejected_images_are_checked_and_keyed(tmp_path: Path) -> None:
    record = good_record(tmp_path, 0)
    colour_image((32, 32), (0, 200, 0)).save(tmp_path / "images" / "other.png")
    roots = ImageRoots(tmp_path / "images", tmp_path / "out")
    plain = parse_pair(record)
    assert plain.rejected_images is None and "rejected_images" not in plain.to_json()
    with_negative = parse_pair({**record, "rejected_images": ["other.png", record["images"][1]]})
    assert with_negative.to_json()["rejected_images"] == ["other.png", record["images"][1]]
    assert pair_key(with_negative, roots) != pair_key(plain, roots)  # the negative's files are in the key
    for bad, reason in ((["other.png"], "1 paths for 2 images"), ("other.png", "not a list"),
                        (record["images"], "the pair's own images")):
        with pytest.raises(ValueError, match=reason):
            parse_pair({**record, "rejected_images": bad})
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps(record) + "\n" + json.dumps({**record, "id": "p2",
                                                               "rejected_images": ["gone.png", "other.png"]}) + "\n")
    report = BadRecordReport(max_bad_fraction=0.5)
    assert [p.id for p in read_pairs(missing, roots, report)] == [record["id"]]
    assert report.bad[0].line == 2 and "gone.png" in report.bad[0].reason  # the negative's image is checked too


# ----- the loss terms ----------------------------------------------------------------------------------------------
# Policy: log π(y_c|I) = −4, log π(y_c|I′) = −7; reference −5 and −6 (pair 2 has no negative). β = 0.5.
# Conditional margin = (−4 + 5) − (−7 + 6) = 2 → −log σ(1) = log(1 + e^−1) = 0.313261687518.
# Anchor: β(−4 + 5) − δ = 0.5 − 0.5 = 0 with δ = 0.5 → −log σ(0) = log 2; pair 2: β(−3 + 3) − 0.5 → log(1 + e^0.5).
POLICY = PairLogps(torch.tensor([-4.0, -3.0]), torch.tensor([-6.0, -5.0]), torch.tensor([2, 2]), torch.tensor([3, 3]),
                   torch.tensor([-7.0, 0.0]), torch.tensor([True, False]))
REFERENCE = PairLogps(torch.tensor([-5.0, -3.0]), torch.tensor([-5.0, -5.0]), torch.tensor([2, 2]),
                      torch.tensor([3, 3]), torch.tensor([-6.0, 0.0]), torch.tensor([True, False]))


def test_conditional_and_anchor_terms_match_hand_numbers() -> None:
    conditional = ConditionalPreferenceLoss(0.5)(POLICY, REFERENCE).losses
    assert conditional.tolist() == pytest.approx([0.313261687518, 0.0])
    anchor = AnchorLoss(0.5, 0.5)(POLICY, REFERENCE).losses
    assert anchor.tolist() == pytest.approx([math.log(2), math.log(1 + math.exp(0.5))])
    for bad, key in (({"conditional_weight": -1.0}, "conditional_weight"),
                     ({"anchor_weight": 1.0, "anchor_delta": float("nan")}, "anchor_delta")):
        problems = DPOConfig.problems(OmegaConf.structured(DPOConfig(**bad)), "dpo")
        assert len(problems) == 1 and problems[0].startswith(f"dpo.{key}=")


def test_module_adds_the_weighted_terms_and_logs_them_apart(monkeypatch) -> None:
    adapter = adapter_for("tiny_llava")
    dpo = DPOConfig(conditional_weight=2.0, anchor_weight=0.5, anchor_delta=0.5, beta=0.5)
    module = DPOModule(adapter, dpo, OptimConfig(), pair_forward=ConcatenatedPairForward(adapter))
    logged: dict[str, float] = {}
    monkeypatch.setattr(module, "log_dict", lambda values, **_: logged.update({k: float(v) for k, v in values.items()}))
    monkeypatch.setattr(module, "log", lambda name, value, **_: logged.update({name: float(value)}))
    monkeypatch.setattr(module, "policy_logps", lambda batch, features=None: POLICY)
    monkeypatch.setattr(module, "reference_logps", lambda batch, features=None: REFERENCE)
    monkeypatch.setattr(module, "shared_image_features", lambda batch: None)

    class Batch:
        num_pairs = 2

    loss = module._step(Batch(), "")  # type: ignore[arg-type]
    text = float(module.loss_fn(POLICY, REFERENCE).losses.mean())
    expected = text + 2.0 * 0.313261687518 + 0.5 * (math.log(2) + math.log(1 + math.exp(0.5))) / 2
    assert float(loss) == pytest.approx(expected)
    assert logged["loss/text"] == pytest.approx(text) and logged["loss/conditional"] == pytest.approx(0.313261687518)
    assert logged["rewards/chosen_original_images"] == pytest.approx(0.5)  # β(−4 + 5), pair 1 only
    assert logged["rewards/chosen_negative_images"] == pytest.approx(-0.5)  # β(−7 + 6)
    assert logged["rewards/image_accuracies"] == 1.0


# ----- the forwards ------------------------------------------------------------------------------------------------
def with_negatives(adapter, items: list[EncodedPair], which: list[bool]) -> list[EncodedPair]:
    """Each marked pair gets a negative: its chosen answer against the same images with the first one replaced."""
    out = []
    for i, (item, has) in enumerate(zip(items, which)):
        if has:
            n = len(item.chosen.image_spans)
            rng = np.random.default_rng(100 + i)
            size = (40 + 10 * i, 30 + 5 * i)  # another size than the replaced image: other image tokens for some
            pictures = [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))]
            pictures += [Image.fromarray(np.random.default_rng(i).integers(0, 255, (4, 4, 3), dtype=np.uint8))
                         for _ in range(n - 1)]
            prompt = "".join(f"Image{k}: <image>\n" for k in range(1, n + 1)) + f"What is in Image{1 + i % n}?"
            chosen = "a red square " * (1 + i % 3)
            item.negative = adapter.encode(adapter.process_images(pictures), prompt, chosen)
        out.append(item)
    return out


@pytest.mark.parametrize("name", ["tiny_llava", "tiny_qwen2_vl", "tiny_internvl", "tiny_idefics3",
                                  "tiny_llava_onevision", "tiny_internlm_xc25", "tiny_qwen3_vl", "tiny_qwen3_vl_moe",
                                  "tiny_gemma3", "tiny_gemma4", "tiny_glm4v"])
@pytest.mark.parametrize(("image_counts", "which"), [([1], [True]), ([2, 4, 1], [True, False, True])])
def test_fast_path_with_negatives_equals_the_plain_path(name: str, image_counts: list[int], which: list[bool]
                                                        ) -> None:
    adapter = adapter_for(name)
    items = with_negatives(adapter, pairs(adapter, image_counts), which)
    dpo = DPOConfig(sft_weight=0.5, conditional_weight=1.0, anchor_weight=0.5)
    plain = DPOModule(adapter, dpo, OptimConfig(), pair_forward=ConcatenatedPairForward(adapter))
    fast = DPOModule(adapter, dpo, OptimConfig(), pair_forward=SharedPrefixPairForward(adapter))
    plain_batch, fast_batch = plain.pair_forward.collate(items), fast.pair_forward.collate(items)
    a, b = plain.policy_logps(plain_batch), fast.policy_logps(fast_batch)
    assert a.has_negative.tolist() == b.has_negative.tolist() == which
    assert torch.allclose(a.negative, b.negative, atol=1e-5, rtol=1e-6)
    assert torch.allclose(a.chosen, b.chosen, atol=1e-5, rtol=1e-6)
    assert not torch.allclose(a.negative[a.has_negative], a.chosen[a.has_negative])  # other images, other log-prob
    assert (a.negative[~a.has_negative] == 0).all()
    # The negative row is the chosen answer against the negative images, computed on its own.
    alone = ConcatenatedPairForward(adapter).collate([EncodedPair("x", items[0].negative, items[0].rejected)])
    assert torch.allclose(ConcatenatedPairForward(adapter)(adapter.model, alone).chosen[0], a.negative[0], atol=1e-5)
    loss_a, grads_a = step(plain, plain_batch)
    loss_b, grads_b = step(fast, fast_batch)
    assert torch.allclose(loss_a, loss_b, atol=1e-5)
    for key in grads_a:
        assert torch.allclose(grads_a[key], grads_b[key], atol=1e-5, rtol=1e-4), key


# ----- the reference cache -----------------------------------------------------------------------------------------
def test_cache_rows_without_the_negative_are_a_miss_for_pairs_trained_with_it(tmp_path: Path) -> None:
    cache = ReferenceCache(tmp_path / "cache")
    text_only = PairLogps(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -4.0]), torch.tensor([1, 2]),
                          torch.tensor([3, 4]))
    with cache.writing():
        cache.add(logps_rows(["a", "b"], text_only))
    has = torch.tensor([True, False])
    assert cache.lookup(["a", "b"]) is not None  # a run without the conditional term: hit
    assert cache.lookup(["a", "b"], has_negative=has) is None  # "a" needs its negative's log-prob: miss
    assert cache.covers(["a", "b"], [False, True]) is False and cache.covers(["a", "b"], [False, False])
    filling = InStepFilling(cache)
    full = PairLogps(text_only.chosen, text_only.rejected, text_only.chosen_tokens, text_only.rejected_tokens,
                     torch.tensor([-9.0, 0.0]), has)
    filling.record(["a", "b"], full)
    filling.close()
    assert filling.written == 1  # only "a" lacked what this run needs
    hit = cache.lookup(["a", "b"], has_negative=has)
    assert hit is not None and hit.negative.tolist() == [-9.0, 0.0] and hit.chosen.tolist() == [-1.0, -2.0]
    reread = ReferenceCache(tmp_path / "cache")  # the five-value row wins over the earlier four-value one
    assert reread.row("a", with_negative=True) == [-1.0, -3.0, 1.0, 3.0, -9.0] and reread.row("b") == [-2.0, -4.0,
                                                                                                          2.0, 4.0]
    with reread.writing():
        reread.add(logps_rows(["a"], PairLogps(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([1]),
                                               torch.tensor([3]))))
    assert ReferenceCache(tmp_path / "cache").row("a", with_negative=True) is not None  # a shorter row never wins


def negative_pairs(tmp_path: Path, pair_files, count: int = 8) -> Path:
    records = []
    for i in range(count):
        record = good_record(tmp_path, i)
        name = f"neg{i}.png"
        colour_image((32, 32), (10, 200, (30 * i) % 256)).save(tmp_path / "images" / name)
        records.append({**record, "rejected_images": [name, record["images"][1]]})
    return pair_files(records)


@pytest.mark.parametrize("prepass", [True, False])
def test_training_with_the_conditional_term_caches_and_reuses_the_negatives(tmp_path: Path, pair_files,
                                                                          monkeypatch, prepass: bool) -> None:
    """The pre-pass, or the first epoch's steps, cache each pair's five values; a second run needs no reference."""
    pairs_file = negative_pairs(tmp_path, pair_files)
    base = ["trainer.max_steps=4", "data.batch_size=4", "data.val_fraction=0", f"data.pairs={pairs_file}",
            f"data.image_root={tmp_path / 'images'}", "trainer.max_epochs=2",
            f"dpo.fast.reference_prepass={str(prepass).lower()}"]
    first = train(compose_train([*base, "dpo.conditional_weight=1.0", "dpo.anchor_weight=0.5"], tmp_path))
    assert first.global_step == 4
    rows = [json.loads(line) for f in (tmp_path / "data" / "reference_logps").glob("*/logps.*.jsonl")
            for line in f.read_text().splitlines()]
    assert len(rows) == 8 and all(len(r["logps"]) == 5 for r in rows)  # every pair once, with its negative
    metrics = (tmp_path / "run").rglob("metrics.csv")
    header = next(metrics).read_text().splitlines()[0]
    for name in ("loss/text", "loss/conditional", "loss/anchor", "rewards/chosen_negative_images"):
        assert name in header
    built: list[DPOModule] = []
    original = DPOModule.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(DPOModule, "__init__", recording)
    train(compose_train([*base, "dpo.conditional_weight=2.0", f"run_dir={tmp_path / 'run2'}"], tmp_path))
    reference = built[-1].reference  # every pair's five-value row cached: no reference at all
    assert isinstance(reference, CachedReference) and reference.compute is None


def test_conditional_term_without_any_negative_names_the_file(tmp_path: Path, pair_files) -> None:
    pairs_file = pair_files([good_record(tmp_path, i) for i in range(4)])
    cfg = compose_train(["trainer.max_steps=1", f"data.pairs={pairs_file}", f"data.image_root={tmp_path / 'images'}",
                         "dpo.conditional_weight=1.0"], tmp_path)
    with pytest.raises(BadRecordError, match=f"no pair of {pairs_file} has one"):
        train(cfg)


def test_dataset_encodes_the_negative_only_when_asked(tmp_path: Path, pair_files, adapter) -> None:
    pairs_file = negative_pairs(tmp_path, pair_files, count=1)
    roots = ImageRoots(tmp_path / "images", tmp_path / "out")
    records = read_pairs(pairs_file, roots, BadRecordReport())
    assert PairDataset(records, roots, adapter, 512)[0].negative is None
    item = PairDataset(records, roots, adapter, 512, image_negatives=True)[0]
    assert item.negative is not None and torch.equal(item.negative.input_ids, item.chosen.input_ids)
    assert not torch.equal(item.negative.pixel_values, item.chosen.pixel_values)


def test_toy_ablation_arms_compose_with_their_negatives() -> None:
    """experiments/toyworld/run.py: the image-side arms build negatives and train the terms; the others do neither."""
    spec = importlib.util.spec_from_file_location("toy_ablation", REPO / "experiments" / "toyworld" / "run.py")
    assert spec is not None and spec.loader is not None
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    seen = set()
    for arm, overrides in ablation.ARMS.items():
        if overrides is None:
            continue
        cfg = ablation.compose_config("train", ["model=toy_llava", "data=toy", *overrides])
        image_terms = cfg.dpo.conditional_weight > 0
        assert image_terms == (cfg.data.augment.negatives.kind != "none"), arm
        assert (ablation.negatives_suffix(overrides) != "") == image_terms
        seen.add((image_terms, cfg.dpo.anchor_weight > 0))
    assert seen == {(False, False), (True, False), (True, True)}


def test_a_negative_that_would_cut_the_chosen_answer_is_dropped(tmp_path: Path, pair_files, adapter) -> None:
    pairs_file = negative_pairs(tmp_path, pair_files, count=1)
    roots = ImageRoots(tmp_path / "images", tmp_path / "out")
    record = read_pairs(pairs_file, roots, BadRecordReport())[0]
    prompt_len, chosen_len = adapter.count_tokens(record.prompt, record.chosen, [(32, 32), (32, 32)])
    fits = apply_length_guard([record], roots, adapter, prompt_len + chosen_len + 8, TooLongPolicy.truncate_answer,
                              image_negatives=True)
    assert fits.negatives_dropped == [] and fits.kept[0].rejected_images == record.rejected_images
    cut = apply_length_guard([record], roots, adapter, prompt_len + chosen_len - 1, TooLongPolicy.truncate_answer,
                             image_negatives=True)
    assert cut.negatives_dropped == [record.id] and cut.truncated == [record.id]
    assert cut.kept[0].rejected_images is None  # trained by the text term alone, its answer cut as before
