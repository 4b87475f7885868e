"""Pair DataModule: collation of mixed image counts, the truncation guard, bad records, the split."""

import logging
from pathlib import Path

import pytest
from conftest import good_record

from miadpo.config import DataConfig, TooLongPolicy
from miadpo.data.dataset import PairDataModule, apply_length_guard, split_train_val
from miadpo.data.pairs import BadRecordError, ImageRoots, PairRecord
from miadpo.dpo.forward import ConcatenatedPairForward


def data_config(tmp_path: Path, pairs: Path, **overrides) -> DataConfig:
    values = {"pairs": str(pairs), "image_root": str(tmp_path / "images"), "out_dir": str(tmp_path / "out"),
              "val_fraction": 0.0, "batch_size": 8, "max_bad_fraction": 0.5}
    return DataConfig(**{**values, **overrides})


def pair_datamodule(cfg: DataConfig, adapter) -> PairDataModule:
    """The DataModule batching as the plain DPO forward reads (one padded batch of chosen then rejected rows)."""
    return PairDataModule(cfg, adapter, ConcatenatedPairForward(adapter).collate)


def test_batches_mix_image_counts(adapter, tmp_path: Path, pair_files) -> None:
    records = [good_record(tmp_path, i, n_images=n) for i, n in enumerate([1, 3, 5, 2])]
    module = pair_datamodule(data_config(tmp_path, pair_files(records)), adapter)
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    inputs = batch.inputs
    assert batch.num_pairs == 4 and inputs["input_ids"].shape[0] == 8
    assert inputs["pixel_values"].shape[0] == 2 * (1 + 3 + 5 + 2)
    image_tokens = (inputs["input_ids"] == adapter.image_token_id).sum(1).tolist()
    by_id = {r["id"]: len(r["images"]) * 16 for r in records}
    assert image_tokens == [by_id[i] for i in batch.ids] * 2


def long_record(tmp_path: Path, index: int, answer_words: int) -> dict:
    record = good_record(tmp_path, index, n_images=5)
    record["chosen"] = " ".join(["red"] * answer_words)
    return record


@pytest.mark.parametrize("policy", ["truncate_answer", "skip"])
def test_too_long_multi_image_pair_is_truncated_or_skipped(adapter, tmp_path: Path, pair_files, caplog,
                                                           policy: str) -> None:
    records = [good_record(tmp_path, i, n_images=2) for i in range(3)] + [long_record(tmp_path, 9, 200)]
    prompt_len, _ = adapter.count_tokens(records[-1]["prompt"], "x", [(32, 32)] * 5)
    max_length = prompt_len + 20  # the short pairs fit; the long answer does not; 5 × 16 image tokens do
    cfg = data_config(tmp_path, pair_files(records), max_length=max_length, on_too_long=policy)
    module = pair_datamodule(cfg, adapter)
    with caplog.at_level(logging.WARNING):
        module.setup("fit")
    ids = [r.id for r in module.train_set.records]
    if policy == "skip":
        assert ids == ["pair-0", "pair-1", "pair-2"] and module.guard.skipped[0][0] == "pair-9"
        assert "skipped 1 pairs longer than data.max_length" in caplog.text
    else:
        assert ids == ["pair-0", "pair-1", "pair-2", "pair-9"] and module.guard.truncated == ["pair-9"]
        item = module.train_set[3]
        assert item.chosen.input_ids.numel() == max_length
        assert len(item.chosen.image_spans) == 5 and item.chosen.answer_length == 20


def test_prompt_longer_than_max_length_is_always_skipped(adapter, tmp_path: Path) -> None:
    record = good_record(tmp_path, 0, n_images=5)
    pair = PairRecord(record["id"], record["images"], record["prompt"], "a", "b")
    roots = ImageRoots.of(DataConfig(image_root=str(tmp_path / "images")))
    result = apply_length_guard([pair], roots, adapter, max_length=50, policy=TooLongPolicy.truncate_answer)
    assert not result.kept and "prompt with images" in result.skipped[0][1]


def test_bad_records_are_skipped_and_counted_by_the_datamodule(adapter, tmp_path: Path, pair_files) -> None:
    records = [good_record(tmp_path, i) for i in range(4)] + ['{"id": "bad"']
    module = pair_datamodule(data_config(tmp_path, pair_files(records)), adapter)
    module.setup("fit")
    assert len(module.train_set) == 4 and len(module.report.bad) == 1


def test_only_bad_records_stop_the_run(adapter, tmp_path: Path, pair_files) -> None:
    module = pair_datamodule(data_config(tmp_path, pair_files(["{", "[]"])), adapter)
    with pytest.raises(BadRecordError, match="2 of 2 records are bad"):
        module.setup("fit")


def test_split_is_deterministic_and_disjoint() -> None:
    records = [PairRecord(f"r{i}", [], "p", "a", "b") for i in range(50)]
    train, val = split_train_val(records, 0.2, seed=3)
    assert len(val) == 10 and not {r.id for r in train} & {r.id for r in val}
    train2, val2 = split_train_val(list(reversed(records)), 0.2, seed=3)
    assert {r.id for r in val2} == {r.id for r in val}
    assert {r.id for r in split_train_val(records, 0.2, seed=4)[1]} != {r.id for r in val}


def test_source_recipe_without_pairs_says_what_to_do(adapter, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data.pairs is not set.*data.prepare=synthetic\)"):
        pair_datamodule(DataConfig(name="grid", source="llava.json"), adapter)

