"""Preference sets users already have (issue 32): TRL's vision layout (JSONL, parquet with embedded images),
RLAIF-V's published columns, a custom column mapping; rows that do not fit named by file and row."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import colour_image, compose_train, good_record

from miadpo.data.pairs import BadRecordError, BadRecordReport, ImageRoots, PairRecord, parse_pair, read_pairs
from miadpo.data.preferences import EMBEDDED_DIR, convert_preferences
from miadpo.select.rules import to_trl
from miadpo.train import train


def png_bytes(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    colour_image((32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def converted(tmp_path: Path, pairs: Path, columns, policy: str = "error") -> list[PairRecord]:
    report = BadRecordReport(policy, max_bad_fraction=0.5)
    path = convert_preferences(pairs, columns, tmp_path / "out", report)
    return read_pairs(path, ImageRoots(tmp_path / "images", tmp_path / "out"), BadRecordReport(), check_images=True)


def test_trl_conversational_jsonl_reads_back_our_own_export(tmp_path: Path) -> None:
    originals = [parse_pair(good_record(tmp_path, i, n_images=1 + i % 3)) for i in range(4)]
    trl = tmp_path / "trl.jsonl"
    trl.write_text("".join(json.dumps(to_trl(p, p.images)) + "\n" for p in originals))
    records = converted(tmp_path, trl, "trl")
    assert [(r.id, r.images, r.prompt, r.chosen, r.rejected) for r in records] == \
        [(p.id, p.images, p.prompt, p.chosen, p.rejected) for p in originals]


def trl_parquet(tmp_path: Path, rows: int = 6) -> Path:
    table = pa.table({
        "prompt": [[{"role": "user", "content": [{"type": "image", "text": None},
                                                 {"type": "text", "text": f"What colour is shape {i}?"}]}]
                   for i in range(rows)],
        "chosen": [[{"role": "assistant", "content": [{"type": "text", "text": "Red."}]}] for _ in range(rows)],
        "rejected": [[{"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}] for _ in range(rows)],
        "images": [[{"bytes": png_bytes((200, 40 * (i % 3), 0)), "path": None}] for i in range(rows)],
    })
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(table, path)
    return path


def test_trl_parquet_with_embedded_images_writes_each_image_once(tmp_path: Path) -> None:
    records = converted(tmp_path, trl_parquet(tmp_path), "trl")
    assert [r.prompt for r in records[:2]] == ["<image>What colour is shape 0?", "<image>What colour is shape 1?"]
    assert records[0].images[0].startswith(f"@out/{EMBEDDED_DIR}/") and records[0].id == "row-1"
    embedded = sorted((tmp_path / "out" / EMBEDDED_DIR).iterdir())
    assert len(embedded) == 3  # six rows, three distinct images: named by content
    stamps = [p.stat().st_mtime_ns for p in embedded]
    converted(tmp_path, trl_parquet(tmp_path), "trl")  # a rerun reuses the conversion and the images
    assert [p.stat().st_mtime_ns for p in embedded] == stamps


def test_rlaif_v_columns_as_published(tmp_path: Path) -> None:
    """RLAIF-V's parquet: ds_name, image (struct), question, chosen, rejected, origin_dataset, origin_split, idx,
    image_path. The question gets the image marker before it."""
    table = pa.table({"ds_name": ["RLAIF-V"] * 2, "image": [{"bytes": png_bytes((0, 90, 200)), "path": "a.png"}] * 2,
                      "question": ["Describe the image.", "Is it blue?"], "chosen": ["A blue square.", "Yes."],
                      "rejected": ["A red circle.", "No."], "origin_dataset": ["x"] * 2, "origin_split": ["{}"] * 2,
                      "idx": ["17", "18"], "image_path": ["a.png"] * 2})
    pq.write_table(table, tmp_path / "RLAIF-V-Dataset_000.parquet")
    records = converted(tmp_path, tmp_path / "RLAIF-V-Dataset_000.parquet", "rlaif_v")
    assert [(r.id, r.prompt, r.chosen) for r in records] == [("17", "<image>\nDescribe the image.", "A blue square."),
                                                            ("18", "<image>\nIs it blue?", "Yes.")]


def test_a_custom_mapping_and_rows_that_do_not_fit_are_named(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    colour_image((32, 32), (10, 20, 30)).save(tmp_path / "images" / "p.png")
    rows = [{"q": "What is it?", "good": "A square.", "bad": "A dog.", "pic": "p.png", "key": "a"},
            {"q": "What is it?", "good": "A square.", "pic": "p.png", "key": "b"},
            {"q": "What is it?", "good": "A square.", "bad": "A dog.", "pic": 7, "key": "c"}]
    source = tmp_path / "mine.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mapping = {"id": "key", "prompt": "q", "chosen": "good", "rejected": "bad", "images": "pic"}
    with pytest.raises(BadRecordError, match=r"mine.jsonl:2 \(id=b\): column 'bad' \(rejected\) missing"):
        converted(tmp_path, source, mapping)
    report = BadRecordReport("skip", max_bad_fraction=0.9)
    convert_preferences(source, mapping, tmp_path / "out2", report)
    assert str(report.bad[1]).endswith("mine.jsonl:3 (id=c): column 'pic': int is neither an image path nor an image "
                                       "struct with bytes or a path")
    broken = tmp_path / "broken.parquet"
    pq.write_table(pa.table({"prompt": ["What is it?"], "chosen": ["A."], "rejected": ["B."],
                             "images": [[{"bytes": b"not an image", "path": None}]]}), broken)
    with pytest.raises(BadRecordError, match=r"broken.parquet:1 \(id=None\): column 'images': embedded bytes are "
                                             "not an image"):
        converted(tmp_path, broken, "trl")
    with pytest.raises(ValueError, match="no such preset"):
        convert_preferences(source, "trll", tmp_path / "out3", BadRecordReport())


def test_train_on_a_trl_parquet_set(tmp_path: Path) -> None:
    cfg = compose_train(["data=pairs", f"data.pairs={trl_parquet(tmp_path)}", "data.columns=trl",
                         f"data.image_root={tmp_path}", "trainer.max_steps=2", "data.val_fraction=0",
                         "data.batch_size=2"], tmp_path)
    assert train(cfg).global_step == 2


def test_a_mix_trains_our_pairs_beside_a_hub_set_with_weights(tmp_path: Path) -> None:
    ours = tmp_path / "pairs.jsonl"
    ours.write_text("".join(json.dumps(good_record(tmp_path, i)) + "\n" for i in range(2)))
    hub = trl_parquet(tmp_path)
    mix = f"data.mix=[{{pairs: {ours}, weight: 2}}, {{pairs: {hub}, columns: trl, weight: 0.5}}]"
    cfg = compose_train(["data=pairs", mix, f"data.image_root={tmp_path / 'images'}", "trainer.max_steps=2",
                         "data.val_fraction=0", "data.batch_size=2"], tmp_path)
    result = train(cfg)
    assert result.global_step == 2
    mixed = [json.loads(line) for line in result.pairs.read_text().splitlines()]
    assert [r["id"] for r in mixed[:4]] == ["0/pair-0", "0/pair-1", "0/pair-0#1", "0/pair-1#1"]
    assert len(mixed) == 4 + 3 and all(r["id"].startswith("1/row-") for r in mixed[4:])
    with pytest.raises(ValueError, match="data.pairs and data.mix are both set"):
        train(compose_train(["data=pairs", f"data.pairs={ours}", mix], tmp_path))


def test_a_broken_line_of_a_mixed_set_is_named_at_its_own_file_and_line(tmp_path: Path) -> None:
    from miadpo.config import PairSetConfig
    from miadpo.data.preferences import mix_pair_sets

    ours = tmp_path / "pairs.jsonl"
    ours.write_text(json.dumps(good_record(tmp_path, 0)) + "\n{broken\n" + json.dumps(good_record(tmp_path, 1)) + "\n")
    with pytest.raises(BadRecordError, match=r"pairs.jsonl:2 \(id=None\): malformed JSON"):
        mix_pair_sets([PairSetConfig(pairs=str(ours))], tmp_path / "out", 0, "error", 0.5)
    mixed = mix_pair_sets([PairSetConfig(pairs=str(ours))], tmp_path / "out", 0, "skip", 0.5)
    assert [json.loads(line)["id"] for line in mixed.read_text().splitlines()] == ["0/pair-0", "0/pair-1"]
