"""Reliability of the data readers: bytes that are not UTF-8, byte-order marks, image markers in answers,
symlinked image folders."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import colour_image, good_record
from omegaconf import OmegaConf
from reliability import case
from test_augment import PHOTOS, TWO_TURNS, write_source

from miadpo.augment import read_llava_source
from miadpo.config import BadRecordPolicy, DataConfig, EvalConfig, SelectionConfig, SFTDataConfig
from miadpo.data.pairs import BadRecordError, BadRecordReport, ImageRoots, read_pairs
from miadpo.select.rules import KEPT, select_pairs

BOM = b"\xef\xbb\xbf"
LATIN1_E = "é".encode("latin-1")


def roots(tmp_path: Path) -> ImageRoots:
    (tmp_path / "out").mkdir(exist_ok=True)
    return ImageRoots(tmp_path / "images", tmp_path / "out")


def report(policy: str = "skip") -> BadRecordReport:
    return BadRecordReport(BadRecordPolicy(policy), max_bad_fraction=0.5)


def jsonl_bytes(records: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)


def load(path: Path, image_roots: ImageRoots, policy: str = "skip") -> tuple[list, BadRecordReport]:
    rep = report(policy)
    return read_pairs(path, image_roots, rep), rep


def source_report() -> BadRecordReport:
    return BadRecordReport(max_bad_fraction=1.0)


# ----- pair files ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", [
    case("pair file", "pair-non-utf8-line", "a JSONL line with non-UTF-8 bytes (a latin-1 'é')",
         "that line is a bad record naming file:line, id and 'not UTF-8 … byte offset N'; the rest loads", "jsonl"),
    case("pair file", "pair-non-utf8-array-record", "a record of a JSON-array pair file with non-UTF-8 bytes",
         "that record is a bad record (file:line, id, byte offset); the records after it still load", "array"),
])
def test_non_utf8_bytes_in_a_pair_file_are_one_bad_record(tmp_path: Path, layout: str) -> None:
    good = [good_record(tmp_path, i) for i in range(4)]
    good[1]["chosen"] = "The circle is rouge café."
    if layout == "jsonl":
        data, path = jsonl_bytes(good), tmp_path / "pairs.jsonl"
    else:
        data, path = json.dumps(good, indent=2, ensure_ascii=False).encode(), tmp_path / "pairs.json"
    data = data.replace("café".encode(), "café".encode("latin-1"))
    path.write_bytes(data)
    offset = data.index(b"\xe9")
    records, rep = load(path, roots(tmp_path))
    assert [r.id for r in records] == ["pair-0", "pair-2", "pair-3"]
    (bad,) = rep.bad
    assert bad.id == "pair-1" and bad.file == str(path)
    assert bad.line == (2 if layout == "jsonl" else data[:data.index(b'"id": "pair-1"')].count(b"\n"))
    assert bad.reason.startswith("not UTF-8") and "0xe9" in bad.reason and f"byte offset {offset}" in bad.reason
    with pytest.raises(BadRecordError, match=rf"{path.name}:{bad.line} \(id=pair-1\): not UTF-8"):
        read_pairs(path, roots(tmp_path), report("error"))


@pytest.mark.parametrize("encoding", [
    case("pair file", "pair-latin1-file", "a whole pair file saved as latin-1",
         "stops with 'N of N records are bad' listing file:line (id): not UTF-8 …, not a UnicodeDecodeError",
         "latin-1"),
])
def test_a_pair_file_of_latin1_lines_stops_with_a_summary_not_a_traceback(tmp_path: Path, encoding: str) -> None:
    records = [good_record(tmp_path, i) for i in range(2)]
    for r in records:
        r["rejected"] = "Un cercle bleu foncé."
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(jsonl_bytes(records).decode().encode(encoding))
    with pytest.raises(BadRecordError, match=r"2 of 2 records are bad(.|\n)*pairs.jsonl:1 \(id=pair-0\): not UTF-8"):
        read_pairs(path, roots(tmp_path), report())


@pytest.mark.parametrize("layout", [
    case("pair file", "pair-utf8-bom", "a UTF-8 byte-order mark at the start of a JSONL pair file",
         "ignored: every record loads, the first included", "jsonl"),
    case("pair file", "pair-utf8-bom-array", "a UTF-8 byte-order mark at the start of a JSON-array pair file",
         "ignored: every record loads", "array"),
])
def test_a_byte_order_mark_costs_no_record(tmp_path: Path, layout: str) -> None:
    good = [good_record(tmp_path, i) for i in range(3)]
    data = jsonl_bytes(good) if layout == "jsonl" else json.dumps(good, indent=2).encode()
    path = tmp_path / ("pairs.jsonl" if layout == "jsonl" else "pairs.json")
    path.write_bytes(BOM + data)
    records, rep = load(path, roots(tmp_path))
    assert [r.id for r in records] == ["pair-0", "pair-1", "pair-2"] and not rep.bad


@pytest.mark.parametrize("separator", [
    case("pair file", "pair-line-separator-in-text", "a raw U+2028 or U+0085 inside a text field (as json.dumps("
         "ensure_ascii=False) writes it)", "part of its record: JSONL lines end at \\n only", "\u2028"),
])
def test_a_line_separator_inside_a_text_field_does_not_split_the_record(tmp_path: Path, separator: str) -> None:
    """``json.dumps(..., ensure_ascii=False)`` (our own writers) leaves U+2028 / U+0085 raw inside strings."""
    good = [good_record(tmp_path, i) for i in range(3)]
    good[1]["prompt"] += f"{separator}Answer briefly.\x85"
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(jsonl_bytes(good))
    records, rep = load(path, roots(tmp_path))
    assert [r.id for r in records] == ["pair-0", "pair-1", "pair-2"] and not rep.bad
    assert records[1].prompt.endswith(f"{separator}Answer briefly.\x85")


@pytest.mark.parametrize(("field", "marker"), [
    case("pair file", "pair-image-marker-in-chosen", "'<image>' inside the chosen answer",
         "a bad record at load: 'image marker in an answer: …' naming the record id and the field",
         "chosen", "<image>"),
    case("pair file", "pair-release-marker-in-rejected", "'<image-placeholder>' inside the rejected answer",
         "a bad record at load: 'image marker in an answer: …' naming the record id and the field",
         "rejected", "<image-placeholder>"),
])
def test_an_image_marker_in_an_answer_is_a_bad_record(tmp_path: Path, field: str, marker: str) -> None:
    good = [good_record(tmp_path, i) for i in range(3)]
    good[1][field] = f"{marker}\nThe circle is green."
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(jsonl_bytes(good))
    records, rep = load(path, roots(tmp_path))
    assert [r.id for r in records] == ["pair-0", "pair-2"]
    (bad,) = rep.bad
    assert (bad.line, bad.id) == (2, "pair-1")
    assert bad.reason.startswith("image marker in an answer:")
    assert "'pair-1'" in bad.reason and repr(field) in bad.reason and marker in bad.reason


# ----- source files (augmentation) ------------------------------------------------------------------------------
@pytest.mark.parametrize("bom", [
    case("source file", "source-utf8-bom", "a UTF-8 byte-order mark at the start of a JSON-array source",
         "ignored: every record is read (was: the whole file refused)", BOM),
])
def test_a_source_json_array_with_a_byte_order_mark_is_read_whole(tmp_path: Path, bom: bytes) -> None:
    source = write_source(tmp_path)
    source.write_bytes(bom + source.read_bytes())
    rep = source_report()
    records, _ = read_llava_source(source, roots(tmp_path), DataConfig().augment, rep)
    assert [r.id for r in records] == PHOTOS and not rep.bad


@pytest.mark.parametrize("layout", [
    case("source file", "source-non-utf8-jsonl-record", "a JSONL source line with non-UTF-8 bytes",
         "that record is skipped as a bad record (file:line, id, 'not UTF-8 … byte offset N'); the rest is read",
         "jsonl"),
    case("source file", "source-non-utf8-array-record",
         "a record of a JSON-array source (LLaVA-665k) with non-UTF-8 bytes",
         "that record is skipped as a bad record (file:line, id, byte offset); the records after it are read",
         "array"),
])
def test_source_encodings(tmp_path: Path, layout: str) -> None:
    source = write_source(tmp_path)
    records_in = json.loads(source.read_text())
    if layout == "jsonl":
        data, source = jsonl_bytes(records_in), tmp_path / "llava.jsonl"
    else:
        data = source.read_bytes()
    data = data.replace(b"It shows moon.", "It shows mo\u00e9n.".encode("latin-1"))
    source.write_bytes(data)
    rep = source_report()
    records, _ = read_llava_source(source, roots(tmp_path), DataConfig().augment, rep)
    assert [r.id for r in records] == [p for p in PHOTOS if p != "moon"]
    (bad,) = rep.bad
    assert bad.id == "moon" and bad.reason.startswith("not UTF-8")
    assert f"byte offset {data.index(LATIN1_E)}" in bad.reason
    if layout == "jsonl":
        assert bad.line == PHOTOS.index("moon") + 1


@pytest.mark.parametrize(("turns", "reason"), [
    case("source file", "source-image-marker-in-answer", "'<image>' inside a gpt turn of a source record",
         "a bad record: 'image marker in an answer: …' naming the record id and the turn",
         [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "<image>\nA cat."}],
         "image marker in an answer: conversation turn 1 (gpt) of record 'x' holds '<image>'"),
    case("source file", "source-release-marker-in-answer", "'<image-placeholder>' inside a later gpt turn",
         "a bad record: 'image marker in an answer: …' naming the record id and the turn",
         [*TWO_TURNS[:3], {"from": "gpt", "value": "Yes <image-placeholder>"}],
         "image marker in an answer: conversation turn 3 (gpt) of record 'x' holds '<image-placeholder>'"),
    case("source file", "source-extra-image-marker-in-question",
         "a single-image record whose questions hold two image markers",
         "a bad record: 'image marker count: …' naming the record id",
         [{"from": "human", "value": "<image>\nWhat is it?"}, TWO_TURNS[1],
          {"from": "human", "value": "<image-placeholder> And now?"}, TWO_TURNS[3]],
         "image marker count: the questions of record 'x' hold 2 image markers for its one image"),
])
def test_image_markers_in_source_answers_are_bad_records(tmp_path: Path, turns: list, reason: str) -> None:
    source = write_source(tmp_path, extra=[{"id": "x", "image": "coco/moon.jpg", "conversations": turns}])
    rep = source_report()
    records, _ = read_llava_source(source, roots(tmp_path), DataConfig().augment, rep)
    assert [r.id for r in records] == PHOTOS
    (bad,) = rep.bad
    assert bad.id == "x" and bad.reason == reason


@pytest.mark.parametrize("marker", [
    case("source file", "source-release-marker-in-question", "'<image-placeholder>' as a question's image marker",
         "read as '<image>'", "<image-placeholder>"),
])
def test_a_release_marker_in_the_question_reads_as_the_image_marker(tmp_path: Path, marker: str) -> None:
    turns = [{"from": "human", "value": f"{marker}\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]
    source = write_source(tmp_path, extra=[{"id": "x", "image": "coco/moon.jpg", "conversations": turns}])
    rep = source_report()
    records, _ = read_llava_source(source, roots(tmp_path), DataConfig().augment, rep)
    assert not rep.bad and records[-1].conversations[0]["value"] == "<image>\nWhat is it?"


# ----- SFT files ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", [
    case("SFT", "sft-non-utf8-line", "an SFT (LLaVA-format) file with a non-UTF-8 line",
         "that record is a bad record (file:line, id, 'not UTF-8 … byte offset N'); the rest loads", "jsonl"),
    case("SFT", "sft-utf8-bom", "a UTF-8 byte-order mark at the start of a JSON-array SFT file",
         "ignored: every record loads", "array-bom"),
])
def test_sft_files_with_bad_bytes(tmp_path: Path, layout: str) -> None:
    from miadpo.sft import read_sft_records

    records = [{"id": f"s{i}", "conversations": [{"from": "human", "value": f"Question {i}?"},
                                                 {"from": "gpt", "value": f"Answer {i}."}]} for i in range(4)]
    if layout == "jsonl":
        data = jsonl_bytes(records).replace(b"Answer 1.", "Réponse 1.".encode("latin-1"))
    else:
        data = BOM + json.dumps(records, indent=2).encode()
    path = tmp_path / "sft.json"
    path.write_bytes(data)
    rep = report()
    loaded = read_sft_records([str(path)], roots(tmp_path), rep)
    if layout == "jsonl":
        assert [r.id for r in loaded] == ["s0", "s2", "s3"]
        (bad,) = rep.bad
        assert (bad.line, bad.id) == (2, "s1") and bad.reason.startswith("not UTF-8")
        assert f"byte offset {data.index(LATIN1_E)}" in bad.reason
    else:
        assert [r.id for r in loaded] == ["s0", "s1", "s2", "s3"] and not rep.bad


@pytest.mark.parametrize("marker", [
    case("SFT", "sft-image-marker-in-answer", "an SFT record whose answer (gpt turn) holds an image marker",
         "a bad record naming the marker (file:line, id); the rest loads", "<image>"),
])
def test_an_image_marker_in_an_sft_answer_is_a_bad_record(tmp_path: Path, marker: str) -> None:
    from miadpo.sft import read_sft_records

    records = [{"id": f"s{i}", "conversations": [{"from": "human", "value": f"Question {i}?"},
                                                 {"from": "gpt", "value": f"Answer {i}."}]} for i in range(4)]
    records[2]["conversations"][1]["value"] = f"It is {marker} here."
    path = tmp_path / "sft.jsonl"
    path.write_bytes(jsonl_bytes(records))
    rep = report()
    loaded = read_sft_records([str(path)], roots(tmp_path), rep)
    assert [r.id for r in loaded] == ["s0", "s1", "s3"]
    (bad,) = rep.bad
    assert (bad.line, bad.id) == (3, "s2") and marker in bad.reason


# ----- selection ----------------------------------------------------------------------------------------------
def candidate(index: int, **fields: Any) -> dict[str, Any]:
    base = {"id": f"c{index}", "format": "pip", "n_images": 1, "target": 1, "images": ["a.png"],
            "prompt": "<image>\nQ?", "ground_truth": "A red car.", "answer": "A blue bus.", "answer_tokens": 4,
            "ground_truth_tokens": 4, "perplexity": 3.0, "correct": False, "ratio": 0.1, "image_scores": None,
            "layer": 1, "logp": -4.0}
    return {**base, **fields}


def negative(answer: str) -> dict[str, Any]:
    return {"kind": "other_image", "asked_about": 2, "answer": answer, "answer_tokens": 4, "perplexity": 1.5,
            "logp": -2.0}


@pytest.mark.parametrize(("fields", "decision_id", "reason"), [
    case("selection", "select-image-marker-in-generated-answer", "the model's generated answer holds '<image>'",
         "the candidate is dropped, counted as 'image marker in the generated answer' (decisions name its id)",
         {"answer": "<image> A blue bus."}, "c1", "image marker in the generated answer"),
    case("selection", "select-release-marker-in-generated-answer", "the generated answer holds '<image-placeholder>'",
         "the candidate is dropped, counted as 'image marker in the generated answer' (decisions name its id)",
         {"answer": "A blue <image-placeholder> bus."}, "c1", "image marker in the generated answer"),
    case("selection", "select-image-marker-in-ground-truth", "the record's ground-truth answer holds '<image>'",
         "the candidate is dropped, counted as 'image marker in the ground truth'",
         {"ground_truth": "<image>\nA red car."}, "c1", "image marker in the ground truth"),
    case("selection", "select-image-marker-in-extra-answer",
         "a right answer's extra answer (the negative) holds '<image>'",
         "no pair from it, counted as 'other_image: image marker in the generated answer'",
         {"answer": "A red car.", "correct": True, "negative": negative("<image> A green bus.")}, "c1-other_image",
         "other_image: image marker in the generated answer"),
])
@pytest.mark.parametrize("name", ["attention", "random"])
def test_an_image_marker_never_becomes_a_rejected_answer(fields: dict, decision_id: str, reason: str,
                                                         name: str) -> None:
    cfg = OmegaConf.structured(SelectionConfig)
    cfg.merge_with({"name": name, "right_answer_negatives": "other_image"})
    result = select_pairs([candidate(0), candidate(1, **fields), candidate(2)], cfg, 0)  # type: ignore[arg-type]
    assert [p.id for p in result.pairs] == ["c0", "c2"]
    decisions = {d["id"]: d["decision"] for d in result.decisions}
    assert decisions[decision_id] == reason and decisions["c0"] == KEPT
    assert result.report["dropped"][reason] == 1
    assert all("<image" not in p.rejected and "<image" not in p.chosen for p in result.pairs)


# ----- image paths --------------------------------------------------------------------------------------------
def symlinked_tree(tmp_path: Path) -> tuple[Path, Path]:
    """``images/coco`` is a symlink to a folder on "another disk" (outside the image root)."""
    elsewhere = tmp_path / "mnt" / "coco"
    elsewhere.mkdir(parents=True)
    colour_image((16, 16), (200, 10, 10)).save(elsewhere / "1.png")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "coco").symlink_to(elsewhere, target_is_directory=True)
    (tmp_path / "out").mkdir()
    return tmp_path / "images", elsewhere


def data_cfg(tmp_path: Path, **overrides: Any) -> Any:
    cfg = OmegaConf.structured(DataConfig(image_root=str(tmp_path / "images"), out_dir=str(tmp_path / "out")))
    cfg.merge_with(overrides)
    return cfg


def pair_with(path: str, index: int = 0) -> dict[str, Any]:
    return {"id": f"p{index}", "images": [path], "prompt": "<image>\nWhat colour?", "chosen": "Red.",
            "rejected": "Blue."}


@pytest.mark.parametrize("follow", [
    case("image paths", "path-symlinked-image-folder",
         "a folder under data.image_root that is a symlink to another disk (images/coco -> /mnt/coco)",
         "followed: its images load (data.follow_symlinks=true, the default)", True),
    case("image paths", "path-symlinked-image-folder-refused",
         "the same symlinked folder with data.follow_symlinks=false",
         "each record using it is a bad record: 'leaves its root through a symlink'", False),
])
def test_symlinked_image_folders(tmp_path: Path, follow: bool) -> None:
    symlinked_tree(tmp_path)
    cfg = data_cfg(tmp_path, follow_symlinks=follow)
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(jsonl_bytes([pair_with("coco/1.png")]))
    r = ImageRoots.of(cfg)
    if follow:
        records, rep = load(path, r)
        assert [p.id for p in records] == ["p0"] and not rep.bad
        assert r.resolve("coco/1.png").is_file()
    else:
        with pytest.raises(ValueError, match="leaves its root .* through a symlink .*data.follow_symlinks"):
            r.resolve("coco/1.png")
        with pytest.raises(BadRecordError, match=r"pairs.jsonl:1 \(id=p0\): image path 'coco/1.png' leaves its root"):
            read_pairs(path, r, report())


@pytest.mark.parametrize("rel", [
    case("image paths", "path-dotdot-through-symlink", "a record path with '..' through a symlinked folder "
         "(coco/../../mnt/coco/1.png)", "refused before any symlink is followed: 'escapes its root', either setting",
         "coco/../../mnt/coco/1.png"),
    case("image paths", "path-dotdot-path", "a record path starting with '..'",
         "refused: 'escapes its root', either setting", "../mnt/coco/1.png"),
    case("image paths", "path-absolute-path", "an absolute record path (/etc/hosts)",
         "refused: 'must be relative to its root', either setting", "/etc/hosts"),
])
@pytest.mark.parametrize("follow", [True, False])
def test_dotdot_and_absolute_paths_stay_refused(tmp_path: Path, rel: str, follow: bool) -> None:
    symlinked_tree(tmp_path)
    r = ImageRoots.of(data_cfg(tmp_path, follow_symlinks=follow))
    with pytest.raises(ValueError, match="must be relative" if rel.startswith("/") else "escapes its root"):
        r.resolve(rel)
    with pytest.raises(ValueError):
        r.resolve("@out/" + rel)


def test_every_config_with_an_image_root_has_follow_symlinks() -> None:
    for config in (DataConfig, SFTDataConfig, EvalConfig):
        assert config().follow_symlinks is True  # type: ignore[attr-defined]
        cfg = OmegaConf.structured(config(image_root="i", out_dir="o", follow_symlinks=False))  # type: ignore
        assert ImageRoots.of(cfg).follow_symlinks is False


@pytest.mark.parametrize("follow", [
    case("image paths", "path-symlinked-out-folder", "a folder under data.out_dir that is a symlink to another disk",
         "composed images written through it get '@out/…' paths that resolve back", True),
])
def test_composed_paths_through_a_symlinked_out_folder(tmp_path: Path, follow: bool) -> None:
    (tmp_path / "disk" / "grid").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    (tmp_path / "images").mkdir()
    os.symlink(tmp_path / "disk", tmp_path / "out" / "images")
    r = ImageRoots.of(data_cfg(tmp_path, follow_symlinks=follow))
    written = tmp_path / "out" / "images" / "grid" / "1.jpg"
    written.write_bytes(b"x")
    rel = r.composed(written)
    assert rel == "@out/images/grid/1.jpg"
    assert r.resolve(rel).read_bytes() == b"x"


@pytest.mark.parametrize("name", [
    case("image paths", "path-with-a-newline", "an image path with a newline or control character (logged raw: a "
         "forged log line)", "shown as its repr in every message, on one line", "evil\nINFO fake line.png"),
])
def test_a_path_with_a_newline_is_shown_on_one_line(tmp_path: Path, pair_files, caplog, name: str) -> None:
    record = {**good_record(tmp_path, 1), "images": [name, "r1_1.png"]}
    report = BadRecordReport(max_bad_fraction=1.0)
    with caplog.at_level("WARNING"):
        read_pairs(pair_files([good_record(tmp_path, 0), record]), ImageRoots(tmp_path / "images", tmp_path / "out"),
                   report)
    (bad,) = report.bad
    assert "\n" not in str(bad) and repr(str((tmp_path / "images" / name).resolve())) in str(bad)
    assert all("\n" not in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("follow", [
    case("image paths", "path-followed-symlink-out-of-root", "an image path that leaves image_root through a followed "
         "symlink (used silently)", "used (follow_symlinks=true), and said once per root in a warning", True),
])
def test_a_followed_symlink_out_of_the_root_is_said_once(tmp_path: Path, caplog, follow: bool) -> None:
    from miadpo.data import pairs as pairs_module

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "linked").symlink_to(tmp_path / "elsewhere")
    roots = ImageRoots(tmp_path / "images", tmp_path / "out", follow_symlinks=follow)
    pairs_module._LEFT_ROOT.discard((tmp_path / "images").resolve())
    with caplog.at_level("WARNING", logger="miadpo.data.pairs"):
        for k in range(3):
            assert roots.resolve(f"linked/{k}.png") == tmp_path / "images" / "linked" / f"{k}.png"
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "'linked/0.png' leaves its root" in warning and str(tmp_path / "elsewhere") in warning
